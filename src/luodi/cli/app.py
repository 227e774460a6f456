"""The `luodi` click group, its consoles, and what several commands share: options, JSON and the verification table.

Commands register onto :data:`cli` from their own modules (compile.py, info.py, ...); this module imports none of
them, so nothing in cli/ imports in a circle. A LuodiError a user caused is one red line and exit status 2, never a
traceback. Text that comes from a package goes through :func:`shown` before rich prints it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from ..errors import LuodiError
from .safe import text as shown

# Pipes and CI logs get rich's 80-column default, too narrow for the tables: widen them to 120, or to $COLUMNS
# when that is wider (a long reason in a table cell then stays on one line).
_COLUMNS = os.environ.get("COLUMNS", "")
_PIPE_WIDTH = max(120, int(_COLUMNS)) if _COLUMNS.isdigit() else 120
out = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LuodiError as exc:
            err.print(f"[bold red]error:[/] {shown(exc)}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="luodi")
def cli() -> None:
    """luodi: compile a trained model into a verified package and run it on any engine."""


# -- options several commands take -----------------------------------------------------------------------------------
allow_failed_option = click.option(
    "--allow-failed",
    is_flag=True,
    help="load a target that failed at compile time (for debugging; `luodi info` says why it failed)",
)


def unlock_options(fn: Any) -> Any:
    """``--license`` and ``--trust``: what opens an encrypted package and whose signature it must carry."""
    fn = click.option("--trust", help="accept the package only if signed by this public key (.pub)")(fn)
    return click.option("--license", "license_file", help="the licence that unlocks an encrypted package")(fn)


def env_passphrase() -> str | None:
    """$LUODI_PASSPHRASE, the passphrase of a package encrypted under one (never a command-line argument)."""
    return os.environ.get("LUODI_PASSPHRASE") or None


# -- output several commands print -----------------------------------------------------------------------------------
def print_json(data: Any) -> None:
    """Plain stdout, not rich: a script reads it. NaN/Inf (a failed comparison) become null, as JSON has neither."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_verification(pkg: Any) -> None:
    """The verification table of the package's model, then one per further model of a multi-model package."""
    _print_model_verification(pkg, "targets, verified against the float reference")
    for name in pkg.model_names:
        _print_model_verification(pkg.submodel(name), f"model '{name}': targets, verified against the float reference")


def _print_model_verification(pkg: Any, title: str) -> None:
    from ..selection import known_timings, label
    from ..verify import OutputComparison

    table = Table(title=title)
    for col in ("target", "MB", "output", "max abs err", "mean abs err", "cosine", "allowed max abs", "result", "ms"):
        table.add_column(col)
    sizes = {n: f["size"] for n, f in pkg.manifest["files"].items()}
    timings = known_timings(pkg, "cpu")
    for t in pkg.targets:
        name = label(t)
        mb = f"{sum(sizes.get(m, 0) for m in t['files'].values()) / 1e6:.1f}"
        ms = f"{timings[name]:.2f}" if name in timings else ""
        name = shown(name)
        ver = t.get("verification")
        if t.get("status") == "failed" and (ver is None or "error" in ver or not ver.get("outputs")):
            reason = t.get("reason") or (ver or {}).get("error") or "failed"
            table.add_row(name, mb, "", "", "", "", "", f"[red]FAILED: {shown(reason)}[/]", ms)
            continue
        if ver is None:
            table.add_row(name, mb, "", "", "", "", "", "[yellow]not verified[/]", ms)
            continue
        if "error" in ver:
            table.add_row(name, mb, "", "", "", "", "", f"[red]FAILED: {shown(ver['error'])}[/]", ms)
            continue
        if ver.get("reference"):
            table.add_row(name, mb, "", "", "", "", "", "[green]the reference[/] (not compared with itself)", ms)
            continue
        tol = ver["tolerance"]
        for output, r in ver["outputs"].items():
            c = OutputComparison(output, **r)
            ok = c.passes(t["precision"])
            allowed = tol["rel_max_abs"] * max(1.0, c.ref_max or 0.0)
            result = "[green]pass[/]" if ok else "[red]FAIL[/]" + (f": {shown(c.mismatch)}" if c.mismatch else "")
            table.add_row(
                name,
                mb,
                shown(output),
                _num(c.max_abs, ".2e"),
                _num(c.mean_abs, ".2e"),
                _num(c.cosine, ".7f"),
                "exact" if c.exact and t["precision"] == "fp32" else f"{allowed:.1e} (cos ≥ {tol['min_cosine']})",
                result,
                ms,
            )
            name, mb, ms = "", "", ""
    out.print(table)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)
