"""int8 targets at compile time: one calibration shared by every int8 target, and each target's QDQ graph with the
agreement gate (top-1 for a classifier, boxes for a detector: luodi.quant.agreement; luodi.quant does the work)."""

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
        trained_ranges=_trained_ranges(src),
    )


def _trained_ranges(src: SourceModel) -> dict[str, tuple[float, float]] | None:
    """The QAT ranges of ``src`` that still hold after the graph passes: an input whose normalisation a pass folded
    into the first Conv now takes pixel values, so its trained (normalised) range is dropped."""
    from ..package.schema import FOLDED_NORMALIZATION

    ranges = src.int8_ranges
    folded = (src.pipeline or {}).get(FOLDED_NORMALIZATION)
    if ranges and isinstance(folded, dict):
        ranges = {k: v for k, v in ranges.items() if k != folded.get("input")}
    return ranges


def quantise_for(
    ptq: Any, backend: Any, max_disagreement: float | None, fallback: bool, float_precision: str | None = None
) -> tuple[Any, dict]:
    """The QDQ graph for ``backend`` and its record; the compile-time gate: a VerificationError for a target
    outside the budget (recorded as failed, or with ``strict`` the end of the compile). ``float_precision``: the
    backend's option of that name, the precision(s) the fallback may keep layers in (luodi.quant.PTQ.for_backend)."""
    from ..quant import DEFAULT_MAX_DISAGREEMENT

    budget = DEFAULT_MAX_DISAGREEMENT if max_disagreement is None else max_disagreement
    qdq, record = ptq.for_backend(backend, budget, allow_fallback=fallback, float_precision=float_precision)
    if not record["passed"]:
        floats = len(record["float_layers"])
        raise _with_record(record)(
            f"target {backend.name}:int8 {_agrees(record, record['validation']['samples'])} ("
            f"{record['validation']['data']}), below the {1 - budget:.2%} the budget {budget:.2%} allows"
            + (f", even with {floats} layers kept in {record.get('float_precision', 'fp32')}" if floats else "")
            + ". Loosen --accuracy-budget, try another --calib-method, or "
            + ("allow the fallback" if not fallback else "drop this int8 target")
        )
    return qdq, record


def _with_record(record: dict[str, Any]) -> Callable[[str], VerificationError]:
    """A VerificationError that carries the target's quantisation record (``exc.record``): the failed target's entry
    keeps it, so the fallback's attempts and Pareto front are there to read when the budget was not met."""

    def make(message: str) -> VerificationError:
        exc = VerificationError(message)
        exc.record = record  # type: ignore[attr-defined]
        return exc

    return make


def _agrees(record: dict[str, Any], samples: int) -> str:
    """ "agrees with the float model on <what the task's measure compares> for <fraction> of ... samples"."""
    measure = record.get("measure", "top-1 class")
    of = "of the boxes on" if measure.startswith("detections") else "of"
    agree = record["agreement"]
    return f"agrees with the float model on its {measure} for {agree:.2%} {of} {samples} validation samples"


def vendor_quantise(
    ptq: Any, backend: Any, model: Any, options: Any, max_disagreement: float | None, fallback: bool, say: Log
) -> tuple[Any, dict[str, Any]]:
    """An int8 target that the engine's own toolkit quantises (``Backend.calibrates_itself``): compiled from the float
    graph with the calibration samples in ``options``, then judged like luodi's own int8 targets (agreement with the
    float model on the validation samples by the package's task: top-1, or a detector's boxes; on the engine
    itself). Outside the budget, with ``fallback``, the layers luodi's sensitivity ranking (for the backend's
    declared policy) finds most sensitive are kept in float by the toolkit (its hybrid quantisation, the
    ``float_tensors`` compile option): 1, 2, 4, ... of them until the budget holds. A VerificationError when it
    still does not."""
    from dataclasses import replace

    from ..quant import DEFAULT_MAX_DISAGREEMENT

    budget = DEFAULT_MAX_DISAGREEMENT if max_disagreement is None else max_disagreement
    artifact = backend.compile(model, options)
    steps: list[dict[str, Any]] = []
    fallback = fallback and "float_tensors" in backend.compile_options  # the toolkit can keep layers in float
    nodes: list[str] = []
    fell_back: dict[str, Any] | None = None
    # the fallback chooses on the tuning half of the validation samples; the record is measured on the other half
    check = vendor_record(ptq, backend, artifact, budget, "tune") if fallback else None
    if check is not None and not check["passed"]:
        say(f"{backend.name}: agreement {check['agreement']:.2%} misses the budget; ranking layers by sensitivity")
        ranking = ptq.rank_layers(backend)
        outputs_of = {n.name: list(n.output) for n in ptq.model.graph.node}
        k = 1
        while ranking:
            k = min(k, len(ranking))
            nodes = [r.node for r in ranking[:k]]
            tensors = [t for n in nodes for t in outputs_of.get(n, [])]
            say(f"{backend.name}: keeping {k} layer(s) in float ({', '.join(nodes[:4])}{', ...' if k > 4 else ''})")
            extra = {**options.extra, "float_tensors": tensors}
            artifact = backend.compile(model, replace(options, extra=extra))
            check = vendor_record(ptq, backend, artifact, budget, "tune")
            steps.append({"float_nodes": k, "agreement": check["agreement"], "cosine": check["cosine"]})
            if check["passed"] or k == len(ranking) or k >= 32:
                break
            k *= 2
        fell_back = {"steps": steps, "ranking": [r.node for r in ranking[:32]]}
    record = vendor_record(ptq, backend, artifact, budget, "report")
    record["float_layers"] = nodes
    if fell_back is not None:
        record["fallback"] = fell_back
    if not record["passed"]:
        raise VerificationError(
            f"target {backend.name}:int8 {_agrees(record, record['validation']['samples'])} "
            f"({ptq.validation_source}), below the {1 - budget:.2%} the budget {budget:.2%} allows"
            + (f", even with {len(record['float_layers'])} layers kept in float" if steps else "")
            + ". Loosen --accuracy-budget, "
            + ("allow the fallback, " if not fallback and "float_tensors" in backend.compile_options else "")
            + f"or use {backend.name}:{next((p for p in backend.precisions if p != 'int8'), 'fp32')}"
        )
    return artifact, record


def vendor_record(ptq: Any, backend: Any, artifact: Any, budget: float, which: str = "report") -> dict[str, Any]:
    """The quantisation record of a toolkit-quantised int8 ``artifact``: agreement, SNR and cosine against the float
    model on the ``which`` validation samples (``PTQ.samples``: "tune" for the fallback's choices, "report" for the
    record), run on the engine (its boundary quantised and dequantised as Session does)."""
    import numpy as np

    from ..backends import open_engine
    from ..quant import cosine, first_output, snr_db
    from ..quant.agreement import describe
    from ..tensor import dequantise_outputs, quantise_feeds

    ins, outs = artifact.io or ([], [])
    with open_engine(backend, artifact) as engine:
        got = [dequantise_outputs(engine.run(quantise_feeds(f, ins)), outs) for f in ptq.samples(which)]
    ref = ptq.float_outputs(which)
    deployed = np.asarray(first_output(got), np.float32)
    agree = ptq.measure(ref, deployed)
    return {
        "policy": f"{backend.name}'s own toolkit" + _settings(artifact.options.get("quantizer")),
        "calibration": {"data": ptq.calibration_source, "samples": len(ptq.feeds)},
        "validation": ptq.validation_record(),
        "max_disagreement": budget,
        "measure": describe(ptq.measure),
        "agreement": agree,
        "snr_db": round(snr_db(ref, deployed), 2),
        "cosine": round(cosine(ref, deployed), 6),
        "float_layers": [],
        "passed": agree is None or 1 - agree <= budget + 1e-12,
    }


def _settings(quantizer: Any) -> str:
    """`` (nncf: preset mixed)`` for an artifact's ``quantizer`` option record; nothing without one."""
    if not isinstance(quantizer, dict):
        return ""
    rest = ", ".join(f"{k} {v}" for k, v in quantizer.items() if k != "name")
    return f" ({quantizer.get('name', '?')}{': ' + rest if rest else ''})"
