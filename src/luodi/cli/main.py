"""`luodi` subcommands; each is a few lines over the Python API plus a rich table.

Errors a user can cause are LuodiErrors: printed as one red line with exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..errors import ZIP_ERRORS, LuodiError
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
    from ..quant.policy import policy_of

    try:
        return policy_of(backend).summary()
    except LuodiError as exc:
        return f"[yellow]no[/]: {shown(str(exc).split(': ', 1)[-1])}"


def _package_options(default_targets: tuple[str, ...]) -> Any:
    """``-o/--output`` and ``-t/--target``, shared by the commands that write a package."""

    def add(fn: Any) -> Any:
        fn = click.option(
            "-t",
            "--target",
            "targets",
            multiple=True,
            default=default_targets,
            show_default=True,
            help="BACKEND or BACKEND:PRECISION; repeat for several targets",
        )(fn)
        return click.option(
            "-o", "--output", required=True, type=click.Path(dir_okay=False), help="the .luodi file to write"
        )(fn)

    return add


@cli.command()
@click.argument("model")
@_package_options(("onnxruntime",))
@click.option("--name", help="model name stored in the package (default: the file name)")
@click.option("--no-verify", is_flag=True, help="skip the comparison with the reference backend")
@click.option("--strict", is_flag=True, help="fail, writing nothing, if a target is outside its tolerance")
@click.option(
    "--accuracy-budget",
    default="fp32",
    show_default=True,
    help="fp32|fp16|bf16|int8: how far from the reference a target may be for backend=auto to pick it; or a "
    "top-1 disagreement such as 1%: what int8 targets may lose (layers fall back to float until it holds)",
)
@click.option("--tune", is_flag=True, help="measure every target's latency on this host and store it")
@click.option("--passes", "show_passes", is_flag=True, help="list the graph passes that ran, nodes before/after")
@click.option(
    "--pass",
    "pass_names",
    multiple=True,
    help="run only these graph passes, in this order (repeat); see `luodi passes`",
)
@click.option("--no-passes", is_flag=True, help="compile the graph exactly as given")
@click.option("--precision", help="precision for every --target given without one, e.g. int8")
@click.option(
    "--calibration", help="int8 calibration data: a folder of images or .npy files, an .npy/.npz, or a dataset"
)
@click.option(
    "--calib-method",
    default="minmax",
    show_default=True,
    type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
    help="how activation ranges are chosen from the calibration data",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(min=1),
    help="how many calibration samples to use (spread over the set) [100]",
)
@click.option("--validation", help="held-apart data int8 agreement is measured on (default: the calibration data)")
@click.option(
    "--preprocess",
    help="how calibration images become tensors for a model without a pipeline: "
    "'resize=224,224;layout=nchw;scale=1/255;mean=0.485,0.456,0.406;std=0.229,0.224,0.225' "
    "(keys: resize, crop, color=rgb|bgr|gray, layout, scale, mean, std, interpolation)",
)
@click.option("--no-fallback", is_flag=True, help="never keep layers in float to meet the accuracy budget")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False), help="sign with this private key")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="an input's shape, e.g. images=1x3x640x640; a dynamic axis may be a range 32..640 (repeat per input)",
)
@click.option(
    "--sample",
    "sample_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="a real input: an .npz with one array per input name, verified against (repeat)",
)
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def compile(
    model: str,
    output: str,
    targets: tuple[str, ...],
    name: str | None,
    no_verify: bool,
    strict: bool,
    accuracy_budget: str,
    tune: bool,
    show_passes: bool,
    pass_names: tuple[str, ...],
    no_passes: bool,
    precision: str | None,
    calibration: str | None,
    calib_method: str,
    calib_samples: int | None,
    validation: str | None,
    preprocess: str | None,
    no_fallback: bool,
    sign_key: str | None,
    input_shapes: tuple[str, ...],
    sample_files: tuple[str, ...],
    quiet: bool,
) -> None:
    """Compile MODEL (an .onnx file or zoo:NAME) into a verified .luodi package.

    A target that fails to compile or verify is recorded in the package as failed, with its reason, and the
    others are written. Exit status: 0 every target verified, 3 some target failed (a partial package), 2 an
    error (nothing written; with --strict any failing target is one).
    """
    from .. import compiler
    from ..progress import Progress

    if precision:
        targets = tuple(t if ":" in t else f"{t}:{precision}" for t in targets)

    with Progress(quiet=quiet) as progress:
        pkg = compiler.compile(
            model,
            output,
            targets,
            name=name,
            samples=[_read_sample(f) for f in sample_files] or None,
            input_shapes=_parse_input_shapes(input_shapes),
            verify=not no_verify,
            strict=strict,
            accuracy_budget=accuracy_budget,
            tune=tune,
            passes=_passes_arg(pass_names, no_passes),
            calibration=calibration,
            calib_method=calib_method,
            calib_samples=calib_samples,
            validation=validation,
            preprocess=preprocess,
            fallback=not no_fallback,
            progress=progress,
        )
    if sign_key:
        from ..package import Package
        from ..package.signing import sign_package

        pkg = Package(sign_package(output, sign_key))
    _print_compiled(pkg, show_passes)


PARTIAL_EXIT = 3
"""The exit status of `luodi compile`/`export` when the package was written but some target failed."""


def _parse_input_shapes(given: tuple[str, ...]) -> dict[str, str] | None:
    from ..errors import InputError

    shapes: dict[str, str] = {}
    for item in given:
        name, sep, dims = item.partition("=")
        if not sep or not name or not dims:
            raise InputError(
                f"--input-shape takes NAME=DIMS, e.g. images=1x3x640x640 or x=1x3x32..640x32..640; got '{item}'"
            )
        if name in shapes:
            raise InputError(f"--input-shape gives input '{name}' twice")
        shapes[name] = dims
    return shapes or None


def _read_sample(path: str) -> dict[str, Any]:
    """An .npz of arrays keyed by input name (never unpickled)."""

    import numpy as np

    from ..errors import InputError

    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputError(f"--sample {path} is a single array; save one array per input: numpy.savez(f, x=...)")
            arrays = {name: npz[name] for name in npz.files}
    except ZIP_ERRORS as exc:
        raise InputError(f"--sample {path} is not a readable .npz of arrays keyed by input name: {exc}") from exc
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            raise InputError(f"--sample {path}: '{name}' is not a numeric array (numpy.savez(f, {name}=array))")
    return arrays


def _failed_targets(pkg: Any) -> list[str]:
    """Targets of every model of ``pkg`` that failed, as "backend:precision (model)"."""
    failed = []
    for model in ["main", *pkg.model_names]:
        for t in pkg.submodel(model).targets:
            ver = t.get("verification") or {}
            if t.get("status") == "failed" or ver.get("passed") is False:
                failed.append(f"{t['backend']}:{t['precision']}" + (f" ({model})" if model != "main" else ""))
    return failed


def _passes_arg(pass_names: tuple[str, ...], no_passes: bool) -> Any:
    return None if no_passes else (list(pass_names) if pass_names else "default")


def _print_compiled(pkg: Any, show_passes: bool) -> None:
    """The package written, its passes on request, the verification table; exit 3 when some target failed."""
    out.print(f"wrote [bold]{shown(pkg.path)}[/] ({pkg.path.stat().st_size / 1e6:.1f} MB)")
    if show_passes:
        _print_passes(pkg.manifest.get("passes", []))
    shapes = pkg.representative_shapes
    out.print(
        "representative shapes (converted and verified at): "
        + shown("; ".join(", ".join(f"{n}={'x'.join(map(str, d))}" for n, d in s.items()) for s in shapes))
    )
    _print_verification(pkg)
    failed = _failed_targets(pkg)
    if failed:
        err.print(
            f"[bold yellow]partial package:[/] {len(failed)} target(s) failed and are recorded as failed: "
            f"{shown(', '.join(failed))}; the others were written (exit status {PARTIAL_EXIT}; --strict writes "
            "nothing instead)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(PARTIAL_EXIT)


def _print_passes(records: list[dict[str, Any]]) -> None:
    table = Table(title="graph passes")
    for col in ("pass", "nodes", "initializers", "ms", "what it did"):
        table.add_column(col, justify="right" if col in ("nodes", "initializers", "ms") else "left")
    for r in records:
        table.add_row(
            shown(r["name"]),
            f"{r['nodes_before']} -> {r['nodes_after']}",
            f"{r['initializers_before']} -> {r['initializers_after']}",
            f"{r['ms']:.0f}",
            shown("; ".join(r["notes"])),
        )
    if not records:
        table.add_row("(none)", "", "", "", "the graph was compiled as given")
    out.print(table)


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
@click.argument("builder")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="a checkpoint (state dict) to load")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    required=True,
    help="example input shape, e.g. 1,3,224,224 (repeat for several inputs); the batch axis stays dynamic",
)
@_package_options(("onnxruntime", "torch"))
@click.option("--name", help="model name stored in the package (default: the module's class name)")
@click.option("--input-name", "input_names", multiple=True, help="name of each input (repeat)")
@click.option("--output-name", "output_names", multiple=True, help="name of each output (repeat)")
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False), help="a pipeline spec (JSON) to store")
@click.option("--static-batch", is_flag=True, help="keep the example's batch size instead of a dynamic one")
@click.option("--strict", is_flag=True, help="fail, writing nothing, if a target is outside its tolerance")
@click.option("--passes", "show_passes", is_flag=True, help="list the graph passes that ran, nodes before/after")
@click.option("--no-passes", is_flag=True, help="compile the exported graph exactly as exported")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def export(
    builder: str,
    weights: str | None,
    input_shapes: tuple[str, ...],
    output: str,
    targets: tuple[str, ...],
    name: str | None,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    pipeline: str | None,
    static_batch: bool,
    strict: bool,
    show_passes: bool,
    no_passes: bool,
    quiet: bool,
) -> None:
    """Export a PyTorch model (BUILDER = my_pkg.models:build) into a verified .luodi package.

    Exit status as for `luodi compile`: 0 every target verified, 3 some target failed, 2 an error.
    """
    import json

    from ..errors import ExportError
    from ..frontends.torch import build_module
    from ..frontends.torch import export as export_package

    try:
        shapes = [tuple(int(d) for d in s.split(",")) for s in input_shapes]
    except ValueError:
        raise ExportError(
            f"--input-shape takes comma-separated integers, e.g. 1,3,224,224; got {input_shapes}"
        ) from None
    spec = None
    if pipeline:
        try:
            spec = json.loads(Path(pipeline).read_text())
        except json.JSONDecodeError as exc:
            raise ExportError(f"{pipeline} is not valid JSON: {exc}") from exc
    from ..progress import Progress

    with Progress(quiet=quiet) as progress:
        with progress.step("loading the module"):
            module = build_module(builder, weights)  # a MissingExtraError if torch is not installed
        import torch

        pkg = export_package(
            module,
            tuple(torch.zeros(s) for s in shapes),
            output,
            targets,
            name=name,
            input_names=list(input_names) or None,
            output_names=list(output_names) or None,
            dynamic_batch=not static_batch,
            pipeline=spec,
            strict=strict,
            passes=None if no_passes else "default",
            progress=progress,
        )
    _print_compiled(pkg, show_passes)


def _print_verification(pkg: Any) -> None:
    """The verification table of the package's model, then one per further model of a multi-model package."""
    _print_model_verification(pkg, "targets, verified against the float reference")
    for name in pkg.model_names:
        _print_model_verification(pkg.submodel(name), f"model '{name}': targets, verified against the float reference")


def _print_model_verification(pkg: Any, title: str) -> None:
    from ..verify import OutputComparison

    table = Table(title=title)
    for col in ("target", "MB", "output", "max abs err", "mean abs err", "cosine", "allowed max abs", "result", "ms"):
        table.add_column(col)
    sizes = {n: f["size"] for n, f in pkg.manifest["files"].items()}
    timings = _timings_here(pkg)
    for t in pkg.targets:
        label = shown(f"{t['backend']}:{t['precision']}")
        mb = f"{sum(sizes.get(m, 0) for m in t['files'].values()) / 1e6:.1f}"
        ms = f"{timings[label]:.2f}" if label in timings else ""
        ver = t.get("verification")
        if t.get("status") == "failed" and (ver is None or "error" in ver or not ver.get("outputs")):
            reason = t.get("reason") or (ver or {}).get("error") or "failed"
            table.add_row(label, mb, "", "", "", "", "", f"[red]FAILED: {shown(reason)}[/]", ms)
            continue
        if ver is None:
            table.add_row(label, mb, "", "", "", "", "", "[yellow]not verified[/]", ms)
            continue
        if "error" in ver:
            table.add_row(label, mb, "", "", "", "", "", f"[red]FAILED: {shown(ver['error'])}[/]", ms)
            continue
        if ver.get("reference"):
            table.add_row(label, mb, "", "", "", "", "", "[green]the reference[/] (not compared with itself)", ms)
            continue
        tol = ver["tolerance"]
        for name, r in ver["outputs"].items():
            c = OutputComparison(name, **r)
            ok = c.passes(t["precision"])
            allowed = tol["rel_max_abs"] * max(1.0, c.ref_max or 0.0)
            result = "[green]pass[/]" if ok else "[red]FAIL[/]" + (f": {shown(c.mismatch)}" if c.mismatch else "")
            table.add_row(
                label,
                mb,
                shown(name),
                _num(c.max_abs, ".2e"),
                _num(c.mean_abs, ".2e"),
                _num(c.cosine, ".7f"),
                "exact" if c.exact and t["precision"] == "fp32" else f"{allowed:.1e} (cos ≥ {tol['min_cosine']})",
                result,
                ms,
            )
            label, mb, ms = "", "", ""
    out.print(table)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _timings_here(pkg: Any) -> dict[str, float]:
    """Batch-1 latencies measured on this host: stored by --tune, else cached by auto-selection."""
    from ..selection import TimingCache, host_key

    found = TimingCache().get(f"{pkg.manifest_sha256}:cpu")
    for t in pkg.targets:
        timing = t.get("timing", {})
        if timing.get("host") == host_key() and timing.get("device") == "cpu":
            found[f"{t['backend']}:{t['precision']}"] = timing["median_ms"]
    return found


@cli.command()
def zoo() -> None:
    """List the pretrained models luodi can build from PyPI packages (use as zoo:NAME)."""
    from .. import zoo as zoo_mod

    for name in zoo_mod.names():
        out.print(f"zoo:{name}")


@cli.command("quantize-analyse")
@click.argument("model")
@click.option("-t", "--target", "backend", default="onnxruntime", show_default=True, help="whose int8 policy to use")
@click.option("--calibration", required=True, help="calibration data: a folder, an .npy/.npz, or a dataset")
@click.option("--calib-method", default="minmax", show_default=True)
@click.option("--calib-samples", type=click.IntRange(min=1), help="calibration samples [100]")
@click.option("--data", help="data the error is measured on (default: the calibration data)")
@click.option(
    "--limit", type=click.IntRange(min=1), default=32, show_default=True, help="samples of --data used per layer"
)
@click.option("--accuracy-budget", help="e.g. 1%: also run the fallback and say which layers stay float")
def quantize_analyse(
    model: str,
    backend: str,
    calibration: str,
    calib_method: str,
    calib_samples: int | None,
    data: str | None,
    limit: int,
    accuracy_budget: str | None,
) -> None:
    """Per-layer int8 sensitivity of MODEL: the error each layer adds when it alone is quantised."""
    from ..backends import get_backend
    from ..frontends import load_model
    from ..quant import PTQ, parse_budget, sensitivity
    from ..tensor import specs_from_onnx

    src = load_model(model)
    inputs, _ = specs_from_onnx(src.model)
    target = get_backend(backend.split(":")[0])
    with err.status("quantising") as status:
        ptq = PTQ(
            src.model,
            inputs,
            calibration,
            pipeline=src.pipeline,
            method=calib_method,
            samples=calib_samples,
            validation=data,
            log=lambda m: status.update(m),
        )
        from ..quant import policy_of

        policy = policy_of(target)
        ranking = sensitivity(ptq.model, ptq.calibration_for(policy), policy, ptq.validation_feeds[:limit])
    table = Table(title=f"int8 sensitivity for {target.name} ({policy.summary()}), most sensitive first")
    for col in ("#", "layer", "op", "SNR dB", "cosine", "top-1 agreement"):
        table.add_column(col)
    for i, r in enumerate(ranking, 1):
        agree = "" if r.agreement is None else f"{r.agreement:.2%}"
        table.add_row(str(i), shown(r.node), shown(r.op), f"{r.snr_db:.1f}", f"{r.cosine:.6f}", agree)
    out.print(table)
    if accuracy_budget:
        ptq._ranking[target.name] = ranking
        _, record = ptq.for_backend(target, parse_budget(accuracy_budget))
        kept = record["float_layers"]
        out.print(
            f"{target.name}:int8 top-1 agreement {record['agreement']:.2%} with {len(kept)} layer(s) kept in float"
            + (f": {', '.join(kept)}" if kept else "")
            + ("" if record["passed"] else " [red](budget not met)[/]")
        )


from ..serve.cli import serve as _serve  # noqa: E402  (`luodi serve`: its own module, FastAPI imported when run)

cli.add_command(_serve)
from ..serve.cli import batch as _batch  # noqa: E402  (`luodi batch --ray`: Ray Data imported when run)

cli.add_command(_batch)

from . import inspect, security  # noqa: E402,F401 - registers info/run/predict/verify; keys, sign, encrypt, license


def main() -> None:
    cli(prog_name="luodi")


if __name__ == "__main__":
    main()
