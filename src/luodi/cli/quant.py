"""`luodi quantize-analyse`: which layers of a model int8 hurts most, over luodi.quant's PTQ.

A table of the per-layer sensitivity ranking and, with --accuracy-budget, the fallback decision that ranking leads
to. It writes nothing; `luodi compile --precision int8` makes the package.
"""

from __future__ import annotations

import click
from rich.table import Table

from .app import cli, err, out
from .safe import text as shown


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
    from ..compiler.load_source import load_source
    from ..quant import PTQ, parse_budget, policy_of
    from ..tensor import specs_from_onnx

    src = load_source(model)
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
        ranking = ptq.rank_layers(target, limit)  # kept by ptq: the fallback below uses this order
    table = Table(title=f"int8 sensitivity for {target.name} ({policy_of(target).summary()}), most sensitive first")
    for col in ("#", "layer", "op", "SNR dB", "cosine", "top-1 agreement"):
        table.add_column(col)
    for i, r in enumerate(ranking, 1):
        agree = "" if r.agreement is None else f"{r.agreement:.2%}"
        table.add_row(str(i), shown(r.node), shown(r.op), f"{r.snr_db:.1f}", f"{r.cosine:.6f}", agree)
    out.print(table)
    if accuracy_budget:
        _, record = ptq.for_backend(target, parse_budget(accuracy_budget))
        kept = record["float_layers"]
        out.print(
            f"{target.name}:int8 top-1 agreement {record['agreement']:.2%} with {len(kept)} layer(s) kept in float"
            + (f": {shown(', '.join(kept))}" if kept else "")
            + ("" if record["passed"] else " [red](budget not met)[/]")
        )
