"""int8 targets at compile time: one calibration shared by every int8 target, and each target's QDQ graph with the
top-1 agreement gate (luodi.quant does the work)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CompileError, InputError, VerificationError
from ..source import SourceModel

Log = Callable[[str], None]


def ptq_for(
    src: SourceModel,
    inputs: list,
    wanted: list,
    calibration: Any,
    method: str,
    samples: Any,
    validation: Any,
    say: Log,
    preprocess: str | dict[str, Any] | None = None,
) -> Any:
    """One calibration shared by every int8 target (None when there is none)."""
    if not any(p == "int8" for _, p in wanted):
        if calibration is not None or preprocess is not None:
            what = "calibration data was" if calibration is not None else "--preprocess (for calibration images) was"
            raise CompileError(f"{what} given but no target is int8; add e.g. --target onnxruntime:int8")
        return None
    if calibration is None:
        raise CompileError(
            "int8 targets need calibration data: pass calibration= (CLI: --calibration DIR_OR_DATASET), e.g. a "
            "folder of representative images or the dataset 'ai-benchmark'"
        )
    from ..quant import PTQ
    from ..quant.preprocess import pipeline_spec

    try:
        pipeline = pipeline_spec(preprocess, inputs) if preprocess is not None else src.pipeline
    except InputError as exc:
        raise CompileError(str(exc)) from None
    return PTQ(
        src.model,
        inputs,
        calibration,
        pipeline=pipeline,
        method=method,
        samples=samples,
        validation=validation,
        log=say,
    )


def quantise_for(ptq: Any, backend: Any, max_disagreement: float | None, fallback: bool) -> tuple[Any, dict]:
    """The QDQ graph for ``backend`` and its record; the compile-time gate: a VerificationError for a target
    outside the budget (recorded as failed, or with ``strict`` the end of the compile)."""
    from ..quant import DEFAULT_MAX_DISAGREEMENT

    budget = DEFAULT_MAX_DISAGREEMENT if max_disagreement is None else max_disagreement
    qdq, record = ptq.for_backend(backend, budget, allow_fallback=fallback)
    if not record["passed"]:
        floats = len(record["float_layers"])
        raise VerificationError(
            f"target {backend.name}:int8 agrees with the float model on top-1 for {record['agreement']:.2%} of "
            f"{record['validation']['samples']} validation samples ({record['validation']['data']}), below the "
            f"{1 - budget:.2%} the budget {budget:.2%} allows"
            + (f", even with {floats} layers kept in float" if floats else "")
            + ". Loosen --accuracy-budget, try another --calib-method, or "
            + ("allow the fallback" if not fallback else "drop this int8 target")
        )
    return qdq, record


def vendor_record(ptq: Any, backend: Any, artifact: Any, io: Any, max_disagreement: float | None) -> dict[str, Any]:
    """The quantisation record of an int8 target its own toolkit quantised (``Backend.calibrates_itself``): its
    agreement with the float model on the validation samples, measured on the engine itself (the boundary quantised
    and dequantised like Session does for int8 I/O); the same compile-time gate as luodi's own int8 targets."""
    import numpy as np

    from ..backends import open_engine
    from ..quant import DEFAULT_MAX_DISAGREEMENT, agreement, cosine, first_output, snr_db
    from ..tensor import dequantise_outputs, quantise_feeds

    budget = DEFAULT_MAX_DISAGREEMENT if max_disagreement is None else max_disagreement
    ins, outs = io or ([], [])
    with open_engine(backend, artifact) as engine:
        got = [dequantise_outputs(engine.run(quantise_feeds(f, ins)), outs) for f in ptq.validation_feeds]
    ref = ptq.float_outputs()
    deployed = np.asarray(first_output(got), np.float32)
    agree = agreement(ref, deployed)
    record = {
        "policy": f"{backend.name}'s own toolkit",
        "calibration": {"data": ptq.calibration_source, "samples": len(ptq.feeds)},
        "validation": {
            "data": ptq.validation_source,
            "samples": len(ptq.validation_feeds),
            "held_apart": ptq.held_apart,
        },
        "max_disagreement": budget,
        "agreement": agree,
        "snr_db": round(snr_db(ref, deployed), 2),
        "cosine": round(cosine(ref, deployed), 6),
        "float_layers": list(artifact.options.get("float_layers", [])),
        "passed": agree is None or 1 - agree <= budget + 1e-12,
    }
    if not record["passed"]:
        raise VerificationError(
            f"target {backend.name}:int8 agrees with the float model on top-1 for {agree:.2%} of "
            f"{len(ptq.validation_feeds)} validation samples ({ptq.validation_source}), below the {1 - budget:.2%} "
            f"the budget {budget:.2%} allows. Loosen --accuracy-budget, or use {backend.name}:fp16"
        )
    return record
