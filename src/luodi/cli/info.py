"""`luodi info`: a package's inputs, outputs, shapes, pipeline, targets and verification, as tables or as JSON.

It reads the manifest through Package and asks selection what auto would pick; it never loads a target's files
(an encrypted package stays locked). Every value that comes from the manifest is printed through ``shown``.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from ..errors import LuodiError
from .app import cli, out, print_json, print_verification
from .safe import text as shown


@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("-d", "--device", default="cpu", show_default=True, help="the device auto-selection is shown for")
@click.option("--json", "as_json", is_flag=True, help="print the package's description as JSON (docs/cli.md)")
def info(package: str, device: str, as_json: bool) -> None:
    """Show a package's inputs, outputs, targets and verification results."""
    from ..package import Package
    from ..package.schema import FOLDED_NORMALIZATION

    pkg = Package(package)
    if as_json:
        print_json(describe(pkg))
        return
    m = pkg.manifest
    out.print(f"[bold]{shown(pkg.name)}[/] version {shown(m.get('version'))} — {shown(m.get('description') or '')}")
    toolchain = m.get("toolchain") if isinstance(m.get("toolchain"), dict) else {}
    out.print(f"created {shown(m.get('created'))} with luodi {shown(toolchain.get('luodi', '?'))}")
    io = Table(title="inputs and outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind, specs in (("input", pkg.inputs), ("output", pkg.outputs)):
        for s in specs:
            io.add_row(kind, shown(s.name), shown(s.dtype), shown(s.shape_str()))
    out.print(io)
    sets = pkg.representative_shapes
    listed = "; ".join(", ".join(f"{n} {list(s)}" for n, s in shapes.items()) for shapes in sets)
    out.print(f"representative shapes (verified, warmed up and timed at): {shown(listed)}")
    for note in (m.get("shapes") or {}).get("notes") or []:
        out.print(f"  [dim]{shown(str(note))}[/]")
    pipe = pkg.pipeline
    if pipe and "graph" in pipe:
        steps = " -> ".join(s.get("op") or f"[model {s['model']}]" for s in pipe["graph"])
        out.print(f"pipeline ({shown(pipe.get('task', '?'))}): {shown(steps)}")
        if pkg.model_names:
            out.print(f"models: main, {shown(', '.join(pkg.model_names))} (each compiled for every target)")
    elif pipe:
        out.print(f"pipeline ({shown(pipe.get('task', '?'))}): {shown(_classic_steps(pipe))}")
    if pipe and pipe.get(FOLDED_NORMALIZATION):
        folded = pipe[FOLDED_NORMALIZATION]
        out.print(
            f"input '{shown(folded['input'])}' takes pixel values: "
            f"normalize(mean={shown(folded['mean'])}, std={shown(folded['std'])}) "
            "is folded into the first Conv"
        )
    passes = m.get("passes") or []
    if passes:
        changed = [
            r["name"]
            for r in passes
            if (r["nodes_before"], r["initializers_before"]) != (r["nodes_after"], r["initializers_after"])
        ]
        out.print(
            f"graph passes: {passes[0]['nodes_before']} -> {passes[-1]['nodes_after']} nodes "
            f"({shown(', '.join(dict.fromkeys(changed)))}); `luodi compile --passes` shows each"
        )
    print_verification(pkg)
    _print_estimates(pkg)
    _print_failed(pkg)
    if pkg.encrypted:
        how = pkg.manifest["encryption"].get("unlock", {})
        key = f"a licence of vendor key {how.get('issuer')}" if how.get("kind") == "license" else "its passphrase"
        signer = pkg.manifest.get("signer", {}).get("key")
        out.print(
            f"encrypted (AES-256-GCM): opens with {shown(key)}" + (f"; signed by key {shown(signer)}" if signer else "")
        )
        return
    from ..selection import select_target

    try:
        _, why = select_target(pkg, device=device)
        out.print(f"backend=auto on {device} here: {shown(why)}")
    except LuodiError as exc:
        out.print(f"[yellow]backend=auto on {device} here: {shown(str(exc))}[/]")


def _classic_steps(pipe: dict[str, Any]) -> str:
    pre = " -> ".join(s["op"] for s in pipe.get("pre", []))
    return pre + " -> [model] -> " + " -> ".join(s["op"] for s in pipe.get("post", []))


def _print_estimates(pkg: Any) -> None:
    """One row per target and device configuration a compile estimated (``--estimate``: Vela on litert:int8)."""
    from ..selection import label

    rows = [(label(t), c, e) for t in pkg.targets for c, e in (t.get("estimate") or {}).items() if isinstance(e, dict)]
    if not rows:
        return
    table = Table(title="estimates for devices not run here (not verified: the device's compiler's own figures)")
    for col in ("target", "device", "ms", "cycles", "SRAM KiB", "flash KiB", "NPU ops", "CPU ops", "on the CPU"):
        table.add_column(col)
    for name, config, e in rows:
        if "error" in e:
            table.add_row(
                shown(name), shown(config), "", "", "", "", "", "", f"[red]no estimate: {shown(e['error'])}[/]"
            )
            continue
        table.add_row(
            shown(name),
            shown(config),
            shown(e.get("inference_ms")),
            shown(e.get("cycles")),
            shown(e.get("sram_kib")),
            shown(e.get("flash_kib")),
            shown(e.get("npu_ops")),
            shown(e.get("cpu_ops")),
            shown(", ".join(str(op) for op in e.get("cpu_fallback") or []) or "-"),
        )
    out.print(table)


def _print_failed(pkg: Any) -> None:
    """One line per target that failed at compile time (main model and further models), with why."""
    from ..selection import label, target_status

    models = [("", pkg)] + [(f"model '{n}' ", pkg.submodel(n)) for n in pkg.model_names]
    lines = [
        f"  {where}{label(t)}: {reason}"
        for where, p in models
        for t in p.targets
        for status, reason in [target_status(t)]
        if status == "failed"
    ]
    if lines:
        out.print(
            f"[red]{len(lines)} target(s) failed at compile time[/] (never chosen by auto; "
            "load one for debugging with --allow-failed / allow_failed=True):"
        )
        for line in lines:
            out.print(shown(line), highlight=False, soft_wrap=True)


def describe(pkg: Any) -> dict[str, Any]:
    """The manifest's useful view, with stable keys (documented in docs/cli.md); `luodi info --json` prints it."""
    from ..selection import label, target_status

    m = pkg.manifest
    sizes = {n: f.get("size", 0) for n, f in m["files"].items()}

    def targets(p: Any) -> list[dict[str, Any]]:
        rows = []
        for t in p.targets:
            status, reason = target_status(t)
            timing = t.get("timing")
            rows.append(
                {
                    "target": label(t),
                    "backend": t["backend"],
                    "precision": t["precision"],
                    "status": status,
                    "reason": reason or None,
                    "size_bytes": sum(sizes.get(member, 0) for member in t.get("files", {}).values()),
                    "engine_version": t.get("engine_version"),
                    "io": t.get("io"),
                    "estimate": t.get("estimate"),
                    "verification": t.get("verification"),
                    "timing": timing if isinstance(timing, dict) else None,
                }
            )
        return rows

    def model(p: Any) -> dict[str, Any]:
        sets = [{n: list(s) for n, s in shapes.items()} for shapes in p.representative_shapes]
        return {
            "inputs": [s.to_dict() for s in p.inputs],
            "outputs": [s.to_dict() for s in p.outputs],
            "shapes": {**(p.manifest.get("shapes") or {}), "representative": sets},
            "targets": targets(p),
        }

    return {
        "name": pkg.name,
        "version": m.get("version"),
        "description": m.get("description"),
        "created": m.get("created"),
        "luodi": (m.get("toolchain") or {}).get("luodi"),
        "toolchain": m.get("toolchain") or {},
        **model(pkg),
        "accuracy_budget": m.get("accuracy_budget"),
        "pipeline": m.get("pipeline"),
        "passes": m.get("passes") or [],
        "models": {n: model(pkg.submodel(n)) for n in pkg.model_names},
        "encrypted": bool(pkg.encrypted),
        "signer": (m.get("signer") or {}).get("key"),
    }
