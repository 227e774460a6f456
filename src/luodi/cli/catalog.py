"""`luodi backends`, `luodi passes` and `luodi zoo`: what this install can compile for, run and build.

Each lists what the registry, the compiler's passes or the zoo report, in a table; none of them loads a model.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..errors import LuodiError
from .app import cli, out
from .safe import text as shown


@cli.command()
def backends() -> None:
    """List every known backend, whether it runs here, and why not."""
    from ..backends import backend_names, get_backend

    table = Table(title="luodi backends")
    cols = ("backend", "available", "version", "devices", "precisions", "int8", "encrypted", "why not / how to install")
    for col in cols:
        table.add_column(col)
    for name in backend_names():
        try:
            a = get_backend(name).available()
        except LuodiError as exc:
            table.add_row(name, "[red]no[/]", "", "", "", "", "", shown(exc))
            continue
        why = a.reason + (f" — {a.install}" if a.install else "")
        table.add_row(
            name,
            "[green]yes[/]" if a.ok else "[red]no[/]",
            a.version,
            ", ".join(a.devices),
            ", ".join(a.precisions),
            _int8_column(get_backend(name)),
            "in memory" if get_backend(name).in_memory else "[yellow]no[/]: loads from files only",
            why,
        )
    out.print(table)


def _int8_column(backend: Any) -> str:
    from ..quant import policy_of

    if getattr(backend, "calibrates_itself", False):
        return "its own toolkit's, calibrated on --calibration"
    try:
        return policy_of(backend).summary()
    except LuodiError as exc:
        return f"[yellow]no[/]: {shown(str(exc).split(': ', 1)[-1])}"


@cli.command()
def passes() -> None:
    """List the graph passes the compiler can run (the default ones are marked)."""
    from ..compiler.passes import DEFAULT, available

    table = Table(title="graph passes")
    table.add_column("pass")
    table.add_column("default")
    table.add_column("what it does")
    for name, summary in available().items():
        table.add_row(name, "yes" if name in DEFAULT else "", summary)
    out.print(table)


@cli.command()
def zoo() -> None:
    """List the pretrained models luodi can build from PyPI packages (use as zoo:NAME)."""
    from .. import zoo as zoo_mod

    for name in zoo_mod.names():
        out.print(f"zoo:{name}")
