"""Per-layer sensitivity (the error a layer adds when it alone is int8) and the mixed-precision fallback
that keeps the most sensitive layers in float until an accuracy budget holds.

Errors are measured on real engines: simulation is the QDQ graph on onnxruntime with graph optimisations off
(fake quantisation in float); the fallback measures the target engine itself. Nothing here writes a package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .agreement import Measure, top1
from .calibrate import Calibration
from .data import Feeds, batches, progress
from .policy import QuantPolicy
from .ptq import quantizable_nodes, quantize

Runner = Callable[[Any], list[dict[str, np.ndarray]]]
# (qdq model, its float layers' precision) -> (the engine's outputs, its ms per batch-1 run or None when not timed)
PrecisionRunner = Callable[[Any, str], tuple[list[dict[str, np.ndarray]], float | None]]


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op: str
    snr_db: float  # of the model's first output, this layer alone quantised
    cosine: float
    agreement: float | None  # top-1 agreement with float, when the first output is a score vector


@dataclass
class FallbackResult:
    """What the fallback decided: the nodes kept in float, the precision they run in, and every point it measured.

    ``steps`` are the attempts in order (float layers, their precision, agreement and, where timed, latency);
    ``pareto`` the attempts no other attempt beats on both latency and agreement, fastest first."""

    budget: float
    float_nodes: list[str]
    agreement: float | None
    met: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    float_precision: str = "fp32"
    latency_ms: float | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def simulate(model: Any, feeds: Sequence[Feeds], batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Run ``model`` (float or QDQ) on onnxruntime with every graph optimisation off: Q/DQ stay float ops, so a
    QDQ graph is fake-quantised exactly as written (the "simulated" figure). Even ORT's basic level is not used: its
    WeightBiasQuantization quantises a float layer fed by a DequantizeLinear (EfficientNet-Lite0 with one conv kept
    in float: logits' SNR 18.8 -> 12.3 dB); luodi's onnxruntime engine turns that one off (backends/onnxruntime.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in _runs(model, feeds, batch)]


def _runs(model: Any, feeds: Sequence[Feeds], batch: int) -> list[Feeds]:
    from .calibrate import _batch_is_symbolic

    return batches(feeds, batch) if _batch_is_symbolic(model) else list(feeds)


def first_output(outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    name = next(iter(outputs[0]))
    return np.concatenate([o[name] for o in outputs])


agreement = top1  # a classifier's measure; the gate and the fallback take the package's (luodi.quant.agreement)


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    r = reference.astype(np.float64).ravel()
    noise = float(((r - got.astype(np.float64).ravel()) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0:
        return float("inf")
    return 10 * float(np.log10(max(signal, 1e-30) / noise))


def cosine(reference: np.ndarray, got: np.ndarray) -> float:
    r, g = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    return 1.0 if nr == ng == 0 else float(r @ g / (nr * ng)) if nr and ng else 0.0


def sensitivity(
    model: Any,
    calibration: Calibration,
    policy: QuantPolicy,
    feeds: Sequence[Feeds],
    nodes: Sequence[str] | None = None,
) -> list[LayerSensitivity]:
    """For each quantisable node (or ``nodes``), the error of the model with that node alone int8,
    most sensitive (lowest SNR) first. ``model`` must be the prepared float graph (``ptq.prepare``)."""
    ref = first_output(simulate(model, feeds))
    ops = {n.name: n.op_type for n in model.graph.node}
    found = []
    for node in progress(list(nodes or quantizable_nodes(model, policy)), "sensitivity: one layer int8 at a time"):
        got = first_output(simulate(quantize(model, calibration, policy, only=[node]), feeds))
        found.append(
            LayerSensitivity(node, ops.get(node, "?"), snr_db(ref, got), cosine(ref, got), agreement(ref, got))
        )
    return sorted(found, key=lambda s: s.snr_db)


def fallback(
    model: Any,
    calibration: Calibration,
    policy: QuantPolicy,
    feeds: Sequence[Feeds],
    budget: float,
    run: PrecisionRunner,
    ranking: Sequence[LayerSensitivity] | None = None,
    max_float_fraction: float = 0.5,
    measure: Measure = top1,
    float_precisions: Sequence[str] = ("fp32",),
) -> tuple[Any, FallbackResult]:
    """Keep the most sensitive layers in float until disagreement with float on ``feeds`` (by ``measure``: top-1
    for a classifier, boxes for a detector) is at most ``budget`` (a fraction, 0.01 = 1%) on the engine ``run``
    drives (``run(qdq_model, float_precision) -> (outputs, ms)``: the float layers in ``float_precision``; ms, the
    engine's latency per batch-1 run, or None when it is not timed).

    For each of ``float_precisions`` (e.g. "bf16" and "fp32" where the engine runs its float layers in either),
    layers are added in order of sensitivity, doubling the count each step and then bisecting back, so a 60-layer
    model needs about a dozen engine runs per precision, not sixty. Where ``run`` times the attempts, the choice is the
    fastest attempt that meets the budget; otherwise the fewest float layers (the first precision's on a tie).
    Returns the QDQ model and the decision, with the Pareto front (latency, agreement) of the timed attempts.
    """
    ref = first_output(simulate(model, feeds))
    ranking = list(ranking) if ranking is not None else sensitivity(model, calibration, policy, feeds)
    order = [s.node for s in ranking]
    limit = max(1, int(len(order) * max_float_fraction))
    steps: list[dict[str, Any]] = []
    cache: dict[tuple[int, str], tuple[Any, dict[str, Any]]] = {}

    def attempt(k: int, precision: str) -> dict[str, Any]:
        precision = "fp32" if k == 0 else precision  # no float layer: the int8 graph as every engine runs it
        if (k, precision) not in cache:
            q = quantize(model, calibration, policy, exclude=order[:k])
            outputs, ms = run(q, precision)
            agree = measure(ref, first_output(outputs))
            agree = 1.0 if agree is None else agree
            step = {"float_layers": k, "float_precision": precision, "agreement": round(agree, 6)}
            if ms is not None:
                step["latency_ms"] = round(ms, 3)
            cache[k, precision] = (q, step)
            steps.append(step)
        return cache[k, precision][1]

    def ok(k: int, precision: str) -> bool:
        return 1.0 - attempt(k, precision)["agreement"] <= budget + 1e-12

    if not ok(0, "fp32"):
        for precision in float_precisions:
            lo, hi = 0, 1
            while not ok(hi, precision) and hi < limit:
                lo, hi = hi, min(limit, hi * 2)
            if not ok(hi, precision):
                continue
            while hi - lo > 1:  # agreement is not strictly monotone in k; this finds a small k that meets the budget
                mid = (lo + hi) // 2
                if ok(mid, precision):
                    hi = mid
                else:
                    lo = mid
    timed = all("latency_ms" in s for s in steps)
    met = [s for s in steps if 1.0 - s["agreement"] <= budget + 1e-12]
    if met:
        key = (lambda s: (s["latency_ms"], s["float_layers"])) if timed else (lambda s: s["float_layers"])
        best = min(met, key=key)
    else:  # nothing met the budget: the closest attempt, the last one on a tie (the most float layers)
        best = max(reversed(steps), key=lambda s: s["agreement"])
    k, precision = best["float_layers"], best["float_precision"]
    return cache[k, precision][0], FallbackResult(
        budget,
        order[:k],
        best["agreement"],
        bool(met),
        steps,
        precision,
        best.get("latency_ms"),
        pareto(steps) if timed else [],
    )


def pareto(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timed attempts that no other attempt beats on both latency (lower) and agreement (higher), fastest first."""
    front: list[dict[str, Any]] = []
    for s in sorted(steps, key=lambda s: (s["latency_ms"], -s["agreement"])):
        if not front or s["agreement"] > front[-1]["agreement"]:
            front.append(dict(s))
    return front
