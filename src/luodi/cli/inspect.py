"""`luodi info`, `luodi run`, `luodi predict` and `luodi verify`: the commands that read a package after it is written.

Each is a few lines over Package, Session and luodi.verify plus a rich table (or JSON); none of them changes a
package, and `run` writes only the output files it names, inside the folder it is given.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from ..errors import ZIP_ERRORS, BackendError, InputError, LuodiError, MissingInputError, UnknownTensorError
from ..package.schema import FOLDED_NORMALIZATION
from .main import _print_verification, cli, err, out
from .safe import text as shown

_ALLOW_FAILED = click.option(
    "--allow-failed",
    is_flag=True,
    help="load a target that failed at compile time (for debugging; `luodi info` says why it failed)",
)


def _open_session(
    package: str, backend: str, device: str, license_file: str | None, trust: str | None, allow_failed: bool
) -> Any:
    """The Session `run` and `predict` use: a licence, a trusted key or $LUODI_PASSPHRASE unlock the package."""
    from ..session import Session

    passphrase = os.environ.get("LUODI_PASSPHRASE") or None
    return Session(
        package,
        backend=backend,
        device=device,
        license=license_file,
        trust=trust,
        passphrase=passphrase,
        allow_failed=allow_failed,
    )


# -- info -----------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("-d", "--device", default="cpu", show_default=True, help="the device auto-selection is shown for")
@click.option("--json", "as_json", is_flag=True, help="print the package's description as JSON (docs/cli.md)")
def info(package: str, device: str, as_json: bool) -> None:
    """Show a package's inputs, outputs, targets and verification results."""
    from ..package import Package

    pkg = Package(package)
    if as_json:
        _print_json(describe(pkg))
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
    _print_verification(pkg)
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
    m = pkg.manifest
    sizes = {n: f.get("size", 0) for n, f in m["files"].items()}

    def targets(p: Any) -> list[dict[str, Any]]:
        from ..selection import label, target_status

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


def _print_json(data: Any) -> None:
    # Plain stdout, not rich: a script reads it. NaN/Inf (a failed comparison) become null, as JSON has neither.
    sys.stdout.write(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- run ------------------------------------------------------------------------------------------------------------
@cli.command("run")
@click.argument("package", type=click.Path(dir_okay=False))
@click.option(
    "-i",
    "--input",
    "inputs",
    multiple=True,
    required=True,
    metavar="NAME=FILE.npy",
    help="an input tensor from an .npy file (repeat per input); FILE.npy alone for a one-input model, "
    "or FILE.npz holding one array per input name",
)
@click.option(
    "-t",
    "--target",
    "-b",
    "--backend",
    "backend",
    default="auto",
    show_default=True,
    help="BACKEND[:PRECISION] to run, or auto",
)
@click.option("-d", "--device", default="cpu", show_default=True)
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), help="write each output as DIR/NAME.npy")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON instead of a table")
@_ALLOW_FAILED
@click.option("--license", "license_file", help="the licence that unlocks an encrypted package")
@click.option("--trust", help="accept the package only if signed by this public key (.pub)")
def run(
    package: str,
    inputs: tuple[str, ...],
    backend: str,
    device: str,
    out_dir: str | None,
    as_json: bool,
    allow_failed: bool,
    license_file: str | None,
    trust: str | None,
) -> None:
    """Run PACKAGE's model on tensors from .npy files; print each output's shape, dtype, min/max/mean.

    Works for any model, with or without a pipeline (`luodi predict` runs the pipeline on raw files)."""
    with _open_session(package, backend, device, license_file, trust, allow_failed) as s:
        feeds = read_inputs(s.inputs, inputs)
        start = time.perf_counter()
        outputs = s.run(feeds)
        ms = (time.perf_counter() - start) * 1e3
        files = write_outputs(outputs, Path(out_dir)) if out_dir else {}
        summary = {
            "package": str(package),
            "target": f"{s.backend}:{s.precision}",
            "selection": s.selection,
            "run_ms": round(ms, 3),
            "outputs": {name: {**tensor_summary(a), "file": files.get(name)} for name, a in outputs.items()},
        }
    if as_json:
        _print_json(summary)
        return
    err.print(f"[dim]{shown(s.selection)}[/]", highlight=False)
    where = f", written to {out_dir}" if out_dir else ""
    table = Table(title=shown(f"outputs of {summary['target']} ({ms:.2f} ms){where}"))
    for col in ("output", "shape", "dtype", "min", "max", "mean", "file"):
        table.add_column(col, justify="right" if col in ("min", "max", "mean") else "left")
    for name, r in summary["outputs"].items():
        nums = [("" if r[k] is None else f"{r[k]:.6g}") for k in ("min", "max", "mean")]
        if r["nonfinite"]:
            nums[2] += f" ({r['nonfinite']} NaN/Inf)"
        table.add_row(shown(name), str(r["shape"]), r["dtype"], *nums, shown(Path(r["file"]).name if r["file"] else ""))
    out.print(table)


def read_inputs(specs: list[Any], items: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` / ``FILE.npy`` (one-input model) / ``FILE.npz`` (arrays by input name) -> feeds.

    Files are read without pickle; anything that cannot be read is an InputError naming the input and the file.
    """
    names = [s.name for s in specs]
    feeds: dict[str, np.ndarray] = {}

    def put(name: str, array: np.ndarray, where: str) -> None:
        if name not in names:
            raise UnknownTensorError(f"{where}: the model has no input '{name}'; its inputs are {names}")
        if name in feeds:
            raise InputError(f"{where}: input '{name}' is given twice")
        feeds[name] = array

    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = "", item
        if not sep and file.endswith(".npz"):
            for key, array in _load(file, "--input", npz=True).items():
                put(key, array, f"--input {file}")
            continue
        if not name:
            if len(names) != 1:
                raise InputError(
                    f"--input {item}: the model has inputs {names}; name the one this file holds: --input NAME={item}"
                )
            name = names[0]
        put(name, _load(file, f"--input {name}"), f"--input {item}")
    missing = [s for s in specs if s.name not in feeds]
    if missing:
        wanted = ", ".join(f"{s.name} ({s.dtype} {s.shape_str()})" for s in missing)
        raise MissingInputError(f"no --input for {wanted}; give each as --input NAME=FILE.npy")
    return feeds


def _load(file: str, where: str, npz: bool = False) -> Any:
    path = Path(file)
    if not path.is_file():
        raise InputError(f"{where}: no file {file}")
    try:
        array = np.load(path, allow_pickle=False)
        if npz and isinstance(array, np.lib.npyio.NpzFile):
            with array:
                return {k: array[k] for k in array.files}
    except ZIP_ERRORS as exc:
        kind = "an .npz" if npz else "an .npy"
        why = "it holds Python objects, which luodi never unpickles" if "pickle" in str(exc) else str(exc)
        raise InputError(f"{where}: {file} is not {kind} file of plain arrays ({why})") from None
    if npz:
        raise InputError(f"{where}: {file} holds a single array, not one per input; give it as --input NAME={file}")
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputError(f"{where}: {file} holds several arrays (an .npz); give it as --input {file} alone")
    return array


def tensor_summary(a: np.ndarray) -> dict[str, Any]:
    """Shape, dtype, and min/max/mean over the finite values (None when there are none)."""
    a = np.asarray(a)
    row: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "min": None, "max": None, "mean": None}
    numeric = a.dtype.kind in "biuf"
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a.ravel() if numeric else a.ravel()[:0]
    row["nonfinite"] = int(a.size - finite.size) if a.dtype.kind == "f" else 0
    if numeric and finite.size:
        row.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean(dtype=np.float64)))
    return row


def write_outputs(outputs: dict[str, np.ndarray], folder: Path) -> dict[str, str]:
    """Each output as ``folder/NAME.npy`` (NAME made safe for a file name); written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    taken: set[str] = set()
    for name, array in outputs.items():
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "output"  # never a path: no '/', no '..'
        base, n = stem, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        dest = folder / f"{stem}.npy"
        tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # created fresh ('x'), mode per umask
        try:
            with open(tmp, "xb") as fh:
                np.save(fh, np.asarray(array), allow_pickle=False)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written[name] = str(dest)
    return written


# -- predict --------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-k", "--top", "k", default=5, show_default=True, type=click.IntRange(min=1), help="how many classes to show"
)
@click.option(
    "-b",
    "--backend",
    "-t",
    "--target",
    "backend",
    default="auto",
    show_default=True,
    help="BACKEND[:PRECISION] to run, or auto",
)
@click.option("-d", "--device", default="cpu", show_default=True)
@click.option(
    "--save-vis",
    type=click.Path(dir_okay=False),
    help="draw detection boxes / text boxes on the input and save the picture here (with several inputs: NAME-N.png)",
)
@_ALLOW_FAILED
@click.option("--license", "license_file", help="the licence that unlocks an encrypted package")
@click.option("--trust", help="accept the package only if signed by this public key (.pub)")
def predict(
    package: str,
    inputs: tuple[str, ...],
    k: int,
    backend: str,
    device: str,
    save_vis: str | None,
    allow_failed: bool,
    license_file: str | None,
    trust: str | None,
) -> None:
    """Run PACKAGE's pipeline on each input (image or .wav files) and print the result."""
    with _open_session(package, backend, device, license_file, trust, allow_failed) as s:
        err.print(f"[dim]{shown(s.selection)}[/]", highlight=False)
        for n, item in enumerate(inputs):
            result = s.predict(item, k=k)
            out.print(_result_table(shown(Path(item).name), result))
            if save_vis:
                from ..pipeline.draw import draw_results

                dest = Path(save_vis) if len(inputs) == 1 else Path(save_vis).with_stem(f"{Path(save_vis).stem}-{n}")
                draw_results(item, result).save(dest)
                err.print(f"[dim]saved {dest}[/]", highlight=False)


def _result_table(title: str, result: Any) -> Table:
    """A table of whatever a pipeline returned: top-k classes, detections, text lines or speech segments."""
    from ..pipeline import Prediction
    from ..pipeline.ops import Detection, SpeechSegment, TextLine

    table = Table(title=title)
    first = result[0] if result else None
    if isinstance(first, Detection):
        for col in ("label", "score", "box x1, y1, x2, y2"):
            table.add_column(col)
        for d in result:
            table.add_row(shown(d.label), f"{d.score:.2f}", ", ".join(f"{v:.0f}" for v in d.box))
    elif isinstance(first, TextLine):
        for col in ("line", "text", "confidence"):
            table.add_column(col)
        for i, t in enumerate(result, 1):
            table.add_row(str(i), shown(t.text), f"{t.score:.3f}")
    elif isinstance(first, SpeechSegment):
        for col in ("segment", "start s", "end s"):
            table.add_column(col)
        for i, seg in enumerate(result, 1):
            table.add_row(str(i), f"{seg.start_s:.2f}", f"{seg.end_s:.2f}")
    elif isinstance(first, Prediction):
        for col in ("rank", "class", "label", "probability"):
            table.add_column(col)
        for rank, p in enumerate(result, 1):
            table.add_row(str(rank), str(p.index), shown(p.label), f"{p.score:.1%}")
    else:
        table.add_column("result")
        table.add_row(shown(repr(result)) if result else "(nothing found)")
    return table


# -- verify ---------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("-t", "--target", "targets", multiple=True, help="BACKEND[:PRECISION] to check (repeat); default all")
@click.option("--against", default="reference", show_default=True, help="what to compare with: reference or a target")
@click.option(
    "--data",
    help="a folder of images or .npy files, an .npy/.npz, or a dataset (default: 2 random inputs at each of the "
    "package's representative shapes)",
)
@click.option("--limit", type=click.IntRange(min=1), help="use this many samples of --data, spread over it")
@click.option("--layerwise", is_flag=True, help="compare every intermediate tensor and mark where the error jumps")
@_ALLOW_FAILED
@click.option("--license", "license_file", help="the licence that unlocks an encrypted package")
@click.option("--trust", help="accept the package only if signed by this public key (.pub)")
def verify(
    package: str,
    targets: tuple[str, ...],
    against: str,
    data: str | None,
    limit: int | None,
    layerwise: bool,
    allow_failed: bool,
    license_file: str | None,
    trust: str | None,
) -> None:
    """Compare PACKAGE's targets with the float reference (or another target) on real data.

    Exits with 1 when a row FAILs (a wrong output shape, NaN/Inf, an error outside the target's tolerance, a
    target that cannot run). An encrypted package is unlocked with --license or $LUODI_PASSPHRASE, in memory,
    as Session does."""
    from ..package.crypto import open_package
    from ..selection import label, parse_target, target_status
    from ..verify.report import data_feeds, failed_row, verify_package
    from ..verify.representative import representative_inputs

    passphrase = os.environ.get("LUODI_PASSPHRASE") or None
    pkg, _ = open_package(package, trust=trust, license=license_file, passphrase=passphrase)
    chosen, skipped = [], []
    for t in pkg.targets if not targets else [pkg.find_target(*parse_target(t)) for t in targets]:
        status, reason = target_status(t)
        if status == "failed" and not t.get("files"):
            skipped.append(failed_row(label(t), "(all)", f"nothing compiled: {reason}"))
        elif status == "failed" and not allow_failed:
            if targets:
                from ..errors import FailedTargetError

                raise FailedTargetError(
                    f"target {label(t)} failed at compile time: {reason}; check it anyway with --allow-failed"
                )
            skipped.append(failed_row(label(t), "(all)", f"failed at compile time, not run: {reason} (--allow-failed)"))
        else:
            chosen.append(t)
    if data is None:
        feeds, where = representative_inputs(pkg, per_set=2), "random input(s) at the representative shapes"
    else:
        feeds, where = data_feeds(pkg, data, limit), "sample(s)"
    try:
        reports, ran = verify_package(pkg, feeds, chosen, against)
    except BackendError as exc:
        if data is not None:
            raise
        shapes = "; ".join(str({n: list(v) for n, v in s.items()}) for s in pkg.representative_shapes)
        raise BackendError(
            f"{exc}. The random inputs were at the package's representative shapes ({shapes}); "
            "if the model cannot run at these, verify it on real inputs with --data"
        ) from exc
    reports += skipped
    table = Table(title=f"against {against} ({shown(ran)}) on {len(feeds)} {where}")
    for col in ("target", "output", "max abs err", "cosine", "SNR dB", "top-1 agreement", "result"):
        table.add_column(col)
    for r in reports:
        agree = "" if r.agreement is None else f"{r.agreement:.2%}"
        result = "[green]pass[/]" if r.passed else f"[red]FAIL[/]: {shown(r.problem)}"
        numbers = [f"{r.max_abs:.3g}", f"{r.cosine:.6f}", f"{r.snr_db:.1f}"] if r.compared else ["-", "-", "-"]
        table.add_row(shown(r.target), shown(r.output), *numbers, agree, result)
    out.print(table)
    if layerwise:
        _print_layerwise(pkg, against, chosen, bool(targets), feeds[0])
    failed = sorted({r.target for r in reports if not r.passed})
    if failed:
        err.print(f"[red]FAIL[/]: {shown(', '.join(failed))}", highlight=False)
        sys.exit(1)


def _print_layerwise(pkg: Any, against: str, chosen: list[dict[str, Any]], named: bool, feeds: dict[str, Any]) -> None:
    from ..selection import parse_target
    from ..verify.layerwise import JUMP_DB
    from ..verify.layerwise import layerwise as compare_layers

    if against == "reference":  # the canonical graph is in every package, a reference target or not
        base = {"backend": "reference", "precision": "fp32"}
    else:
        base = pkg.find_target(*parse_target(against))
    for t in [t for t in chosen if t is not base and (named or t["backend"] != "reference")]:
        report = compare_layers(pkg, base, t, feeds)
        lt = Table(
            title=f"layer-wise: {shown(report.b)} against {shown(report.a)} "
            f"(first tensor below {JUMP_DB:.0f} dB marked)"
        )
        for col in ("#", "tensor", "op", "cosine", "SNR dB", "max abs"):
            lt.add_column(col)
        for i, row in enumerate(report.rows):
            style = "bold red" if i == report.first_jump else None
            lt.add_row(
                str(i),
                shown(row.tensor),
                shown(row.op),
                f"{row.cosine:.6f}",
                f"{row.snr_db:.1f}",
                f"{row.max_abs:.3g}",
                style=style,
            )
        out.print(lt)
        if report.first_jump is not None:
            row = report.rows[report.first_jump]
            out.print(f"error jumps first at [bold]{shown(row.tensor)}[/] ({shown(row.op)}, node {shown(row.node)})")
