"""`luodi run` and `luodi predict`: a package's model on tensors from .npy files, or its pipeline on raw files.

Each opens one Session (a licence, a trusted key or $LUODI_PASSPHRASE unlock it), runs it and prints a table (or
JSON). Arrays are read and written by luodi.arrays (no pickle; outputs only inside the folder given, whole);
this module only maps ``--input`` flags to input names.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from ..errors import InputError, MissingInputError, UnknownTensorError
from .app import allow_failed_option, cli, env_passphrase, err, out, print_json, unlock_options
from .safe import text as shown


def _open_session(
    package: str, backend: str, device: str, license_file: str | None, trust: str | None, allow_failed: bool
) -> Any:
    from ..session import Session

    return Session(
        package,
        backend=backend,
        device=device,
        license=license_file,
        trust=trust,
        passphrase=env_passphrase(),
        allow_failed=allow_failed,
    )


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
@allow_failed_option
@unlock_options
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
    from ..arrays import save, summary

    with _open_session(package, backend, device, license_file, trust, allow_failed) as s:
        feeds = read_inputs(s.inputs, inputs)
        start = time.perf_counter()
        outputs = s.run(feeds)
        ms = (time.perf_counter() - start) * 1e3
        files = save(outputs, out_dir) if out_dir else {}
        result = {
            "package": str(package),
            "target": f"{s.backend}:{s.precision}",
            "selection": s.selection,
            "run_ms": round(ms, 3),
            "outputs": {name: {**summary(a), "file": files.get(name)} for name, a in outputs.items()},
        }
    if as_json:
        print_json(result)
        return
    err.print(f"[dim]{shown(s.selection)}[/]", highlight=False)
    where = f", written to {out_dir}" if out_dir else ""
    table = Table(title=shown(f"outputs of {result['target']} ({ms:.2f} ms){where}"))
    for col in ("output", "shape", "dtype", "min", "max", "mean", "file"):
        table.add_column(col, justify="right" if col in ("min", "max", "mean") else "left")
    for name, r in result["outputs"].items():
        nums = [("" if r[k] is None else f"{r[k]:.6g}") for k in ("min", "max", "mean")]
        if r["nonfinite"]:
            nums[2] += f" ({r['nonfinite']} NaN/Inf)"
        table.add_row(shown(name), str(r["shape"]), r["dtype"], *nums, shown(Path(r["file"]).name if r["file"] else ""))
    out.print(table)


def read_inputs(specs: list[Any], items: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` / ``FILE.npy`` (one-input model) / ``FILE.npz`` (arrays by input name) -> feeds.

    Files are read without pickle; anything that cannot be read is an InputError naming the input and the file.
    """
    from ..arrays import load

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
            arrays = load(file, "--input")
            if not isinstance(arrays, dict):
                raise InputError(
                    f"--input: {file} holds a single array, not one per input; give it as --input NAME={file}"
                )
            for key, array in arrays.items():
                put(key, array, f"--input {file}")
            continue
        if not name:
            if len(names) != 1:
                raise InputError(
                    f"--input {item}: the model has inputs {names}; name the one this file holds: --input NAME={item}"
                )
            name = names[0]
        array = load(file, f"--input {name}")
        if isinstance(array, dict):
            raise InputError(f"--input {name}: {file} holds several arrays (an .npz); give it as --input {file} alone")
        put(name, array, f"--input {item}")
    missing = [s for s in specs if s.name not in feeds]
    if missing:
        wanted = ", ".join(f"{s.name} ({s.dtype} {s.shape_str()})" for s in missing)
        raise MissingInputError(f"no --input for {wanted}; give each as --input NAME=FILE.npy")
    return feeds


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
@allow_failed_option
@unlock_options
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
