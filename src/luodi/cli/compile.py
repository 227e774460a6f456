"""`luodi compile` and `luodi export`: the commands that write a package, over luodi.compile and luodi.export.

Each turns its flags into the API's arguments and prints what was written (the passes on request, the shapes it
was verified at, the verification table). Exit status: 0 every target verified, 3 a partial package (some target
failed and is recorded as failed), 2 an error (nothing written). Nothing here compiles, verifies or reads a model.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from .app import cli, err, out, print_verification
from .safe import text as shown

PARTIAL_EXIT = 3
"""The exit status of `luodi compile`/`export` when the package was written but some target failed."""


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
@click.option(
    "--int8-io",
    is_flag=True,
    help="int8 targets read and write the quantised integers (scale and zero point in the package), not float",
)
@click.option(
    "--estimate",
    "estimates",
    multiple=True,
    metavar="CONFIG",
    help="estimate litert:int8 on an Arm Ethos-U NPU with Vela, e.g. ethos-u55-128 (repeat; needs luodi[vela])",
)
@click.option(
    "--option",
    "target_options",
    multiple=True,
    metavar="BACKEND.KEY=VALUE",
    help="an engine's compile option, e.g. rknn.platform=rk3566 (repeat; `luodi backends` lists what each takes)",
)
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
    int8_io: bool,
    target_options: tuple[str, ...],
    estimates: tuple[str, ...],
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
    from ..arguments import engine_options, per_input
    from ..arrays import load_npz
    from ..progress import Progress

    if precision:
        targets = tuple(t if ":" in t else f"{t}:{precision}" for t in targets)

    with Progress(quiet=quiet) as progress:
        pkg = compiler.compile(
            model,
            output,
            targets,
            name=name,
            samples=[load_npz(f, "--sample") for f in sample_files] or None,
            input_shapes=per_input(
                "--input-shape", input_shapes, "NAME=DIMS", "images=1x3x640x640 or x=1x3x32..640x32..640"
            )
            or None,
            verify=not no_verify,
            strict=strict,
            accuracy_budget=accuracy_budget,
            tune=tune,
            passes=None if no_passes else (list(pass_names) if pass_names else "default"),
            calibration=calibration,
            calib_method=calib_method,
            calib_samples=calib_samples,
            validation=validation,
            preprocess=preprocess,
            fallback=not no_fallback,
            int8_io=int8_io,
            target_options=engine_options(target_options),
            estimate=list(estimates) or None,
            progress=progress,
        )
    if sign_key:
        from ..package import Package
        from ..package.signing import sign_package

        pkg = Package(sign_package(output, sign_key))
    _print_compiled(pkg, show_passes)


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
    from pathlib import Path

    from ..compiler.export import export as export_package
    from ..errors import ExportError
    from ..frontends.torch import build_module
    from ..progress import Progress

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


def _print_compiled(pkg: Any, show_passes: bool) -> None:
    """The package written, its passes on request, the verification table; exit 3 when some target failed."""
    from ..selection import label, target_status

    out.print(f"wrote [bold]{shown(pkg.path)}[/] ({pkg.path.stat().st_size / 1e6:.1f} MB)")
    if show_passes:
        _print_passes(pkg.manifest.get("passes", []))
    shapes = pkg.representative_shapes
    out.print(
        "representative shapes (converted and verified at): "
        + shown("; ".join(", ".join(f"{n}={'x'.join(map(str, d))}" for n, d in s.items()) for s in shapes))
    )
    print_verification(pkg)
    failed = [
        label(t) + (f" ({model})" if model != "main" else "")
        for model in ["main", *pkg.model_names]
        for t in pkg.submodel(model).targets
        if target_status(t)[0] == "failed"
    ]
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
