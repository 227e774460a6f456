"""Post-training int8 quantisation: calibration data, observers, PTQ into a QDQ graph per engine policy,
per-layer sensitivity and the mixed-precision fallback. Compile-time only (onnxruntime.quantization);
a package's runtime never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .agreement import describe, measure_for
from .calibrate import METHODS, Calibration, calibrate
from .data import DATASETS, Feeds, batches, load_feeds
from .opset import default_opset, for_quantisation
from .policy import QuantPolicy, policy_of
from .ptq import layers, prepare, quantizable_nodes, quantize
from .qat import QATConfig, ranges_calibration, trained_policy
from .sensitivity import (
    FallbackResult,
    LayerSensitivity,
    agreement,
    cosine,
    fallback,
    first_output,
    sensitivity,
    simulate,
    snr_db,
)

#: Top-1 disagreement with the float model that an int8 target may have when no budget is given (1%).
DEFAULT_MAX_DISAGREEMENT = 0.01
DEFAULT_CALIB_SAMPLES = 100


def parse_budget(value: str | float | None) -> float | None:
    """``"1%"`` / ``"0.5%"`` / ``0.01`` -> a top-1 disagreement fraction; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        frac = float(value)
    else:
        text = value.strip()
        try:
            frac = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise InputError(
                f"accuracy budget '{value}' is neither a precision class (fp32, fp16, bf16, int8) nor a top-1 "
                "disagreement such as '1%'"
            ) from None
    if not 0 <= frac < 1:
        raise InputError(f"a top-1 disagreement budget must be between 0% and 100%, not {value}")
    return frac


def run_on(
    backend: Any, model: Any, feeds: Sequence[Feeds], precision: str = "int8", float_precision: str = "fp32"
) -> list[dict[str, np.ndarray]]:
    """Compile ``model`` for ``backend`` in memory, load it and run ``feeds`` (batched where the batch is
    symbolic): the deployed engine's outputs, the figure an int8 target is judged by. ``float_precision``: what
    the int8 graph's float layers run in (the backend's ``float_precision`` option; "fp32" sets nothing)."""
    from ..backends import run_once
    from .calibrate import _batch_is_symbolic

    runs = batches(feeds, 16) if _batch_is_symbolic(model) else list(feeds)
    return run_once(backend, model, runs, _options(precision, float_precision))


def measure_on(
    backend: Any,
    model: Any,
    feeds: Sequence[Feeds],
    precision: str = "int8",
    float_precision: str = "fp32",
    timed_runs: int = 30,
) -> tuple[list[dict[str, np.ndarray]], float | None]:
    """:func:`run_on`'s outputs, and from the same engine the milliseconds of the fastest of ``timed_runs`` runs of
    the first feed (after 3 warm-up runs; None with ``timed_runs=0``): the latency the fallback weighs against
    agreement. The fastest, not the median: on a shared host the median of a few milliseconds moved 2-6x between
    attempts that differ by one layer (EfficientNet-Lite0, 2 loaded cores); the least-disturbed run moves less."""
    import time

    from ..backends import open_engine
    from .calibrate import _batch_is_symbolic

    runs = batches(feeds, 16) if _batch_is_symbolic(model) else list(feeds)
    with open_engine(backend, model, _options(precision, float_precision)) as engine:
        outputs = [engine.run(f) for f in runs]
        if not timed_runs or not feeds:
            return outputs, None
        for _ in range(3):
            engine.run(feeds[0])
        times = []
        for _ in range(timed_runs):
            t0 = time.perf_counter()
            engine.run(feeds[0])
            times.append(time.perf_counter() - t0)
    return outputs, float(min(times) * 1e3)


def _options(precision: str, float_precision: str) -> Any:
    from ..backends import CompileOptions

    extra = {"float_precision": float_precision} if float_precision != "fp32" else {}
    return CompileOptions(precision=precision, extra=extra)


def float_precisions(backend: Any, asked: str | None) -> tuple[str, ...]:
    """The precisions the fallback may keep float layers in for ``backend``, from its ``float_precision`` option
    (None: fp32 only; "auto": every one the engine runs natively on this host, then fp32)."""
    if asked in (None, "fp32"):
        return ("fp32",)
    here = tuple(backend.int8_float_precisions())
    if asked == "auto":
        return (*here, "fp32")
    if asked not in FLOAT_PRECISIONS:
        raise InputError(
            f"{backend.name}: float_precision '{asked}' is none of {', '.join(FLOAT_PRECISIONS)} or 'auto'"
        )
    return (asked,)


#: What an int8 graph's float layers may run in, where the engine has it (the ``float_precision`` option).
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")


class PTQ:
    """One float model calibrated once, then quantised for any number of engine policies.

    ``calibration`` and ``validation`` are data sources for :func:`load_feeds`. Agreement is measured on
    ``validation`` (held apart from calibration when given; else the calibration samples, recorded as such).
    """

    def __init__(
        self,
        model: Any,
        inputs: Sequence[Any],
        calibration: Any,
        *,
        pipeline: dict[str, Any] | None = None,
        method: str = "minmax",
        samples: int | None = None,
        validation: Any = None,
        log: Callable[[str], None] | None = None,
        trained_ranges: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.say = log or (lambda _m: None)
        # activation ranges from quantisation-aware training (qat.py), by tensor name: they replace calibration
        # where they exist, and the weights (already on the int8 grid) are rounded to nearest, uncorrected
        self.trained_ranges = trained_ranges or None
        if method not in METHODS:
            raise InputError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
        self.method = method
        self.source_opset = default_opset(model)
        model = for_quantisation(model, self.say)  # before any data is read: an old opset fails in the first second
        self._source, self._prepared = model, None  # prepared when luodi quantises (a vendor toolkit may instead)
        self.calibration_source = _describe(calibration)
        self.feeds = load_feeds(calibration, inputs, pipeline, samples or DEFAULT_CALIB_SAMPLES, "calibration")
        if validation is None:
            self.validation_feeds, self.validation_source, self.held_apart = self.feeds, self.calibration_source, False
        else:
            self.validation_feeds = load_feeds(validation, inputs, pipeline, None, "validation")
            self.validation_source, self.held_apart = _describe(validation), True
        # The fallback chooses on one half of the validation samples and agreement is reported (and gated) on the
        # other: a figure measured on the samples a search tuned for is the figure it was tuned for.
        self.tune_feeds, self.report_feeds = split_validation(self.validation_feeds)
        self.measure = measure_for(pipeline)  # top-1 for a classifier, boxes for a detector's pipeline
        self._calibrations: dict[tuple, Calibration] = {}
        self._float: dict[str, np.ndarray] = {}
        self._ranking: dict[str, list[LayerSensitivity]] = {}

    @property
    def model(self) -> Any:
        """The float graph prepared for quantisation (onnxruntime's pre-processing), on first use: an int8 target that
        its engine's own toolkit quantises (e.g. rknn) needs only the samples, and onnxruntime's symbolic shape
        inference fails on some graphs (YOLOv8n's) that such a toolkit takes."""
        if self._prepared is None:
            self.say("preparing the float graph for quantisation")
            self._prepared = prepare(self._source)
        return self._prepared

    def policy_for(self, backend: Any) -> QuantPolicy:
        """``backend``'s int8 policy; for a QAT model without bias correction and with nearest weight rounding
        (its weights were trained on the grid; moving them again would undo the training)."""
        policy = policy_of(backend)
        if self.trained_ranges:
            policy = trained_policy(policy)
        return policy

    def calibration_for(self, policy: QuantPolicy) -> Calibration:
        key = (tuple(policy.ops), policy.activations, policy.bias_correction, policy.weight_rounding)
        if key not in self._calibrations:
            method = "minmax" if self.trained_ranges else self.method
            self.say(f"calibrating ({method}) on {len(self.feeds)} samples")
            calib = calibrate(self.model, self.feeds, method, policy)
            if self.trained_ranges:
                calib = ranges_calibration(calib, self.trained_ranges)
                self.say(f"{calib.trained} of {len(calib.ranges.keys())} activation ranges from QAT")
            self._calibrations[key] = calib
        return self._calibrations[key]

    def samples(self, which: str) -> list[Feeds]:
        """The validation samples ``"tune"`` (what the fallback chooses on) or ``"report"`` (what agreement is
        reported and gated on)."""
        return self.tune_feeds if which == "tune" else self.report_feeds

    def float_outputs(self, which: str = "report") -> np.ndarray:
        """The float model's first output on the ``which`` samples (see :meth:`samples`)."""
        if which not in self._float:
            graph = self._prepared if self._prepared is not None else self._source  # the same function either way
            self._float[which] = first_output(simulate(graph, self.samples(which)))
        return self._float[which]

    def validation_record(self) -> dict[str, Any]:
        """Which samples the agreement is reported on and which the fallback chose on (the manifest's record)."""
        return {
            "data": self.validation_source,
            "samples": len(self.report_feeds),
            "held_apart": self.held_apart,
            "tuned_on": {
                "data": self.validation_source,
                "samples": len(self.tune_feeds),
                "same_samples": self.tune_feeds is self.report_feeds,
            },
        }

    def rank_layers(self, backend: Any, limit: int = 32) -> list[LayerSensitivity]:
        """Layers by the error each adds when it alone is quantised for ``backend``'s policy, most sensitive
        first, on the first ``limit`` validation samples; kept, so a later :meth:`for_backend` falls back in
        this order instead of ranking again."""
        policy = self.policy_for(backend)
        ranking = sensitivity(self.model, self.calibration_for(policy), policy, self.tune_feeds[:limit])
        self._ranking[backend.name] = ranking
        return ranking

    def for_backend(
        self,
        backend: Any,
        max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
        allow_fallback: bool = True,
        float_precision: str | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """The QDQ graph for ``backend``'s policy and the manifest record: policy, calibration, agreement with
        the float model on the deployed engine and in simulation, any layers kept in float and the precision they
        run in. ``float_precision`` (the backend's option of that name): which precision(s) the fallback may keep
        layers in, "fp32" (None), one the engine runs them in ("bf16" on openvino), or "auto" (every one this host
        runs natively, and fp32): the fallback then keeps the fastest attempt that meets the budget."""
        policy = self.policy_for(backend)
        calib = self.calibration_for(policy)
        candidates = float_precisions(backend, float_precision)

        def deployed(q: Any, precision: str = "fp32") -> tuple[list[dict[str, np.ndarray]], float | None]:
            # timed (30 batch-1 runs each) only where the fallback weighs one precision's latency against another's
            timed_runs = 30 if len(candidates) > 1 else 0
            return measure_on(backend, q, self.tune_feeds, float_precision=precision, timed_runs=timed_runs)

        self.say(f"quantising for {backend.name} ({policy.summary()})")
        if allow_fallback:
            ranking = self._ranking.get(backend.name)
            qdq = quantize(self.model, calib, policy)
            first = self.measure(self.float_outputs("tune"), first_output(run_on(backend, qdq, self.tune_feeds)))
            decision = None
            if first is not None and 1 - first > max_disagreement + 1e-12:
                if ranking is None:
                    self.say(f"{backend.name}: agreement {first:.2%} misses the budget; ranking layers by sensitivity")
                    ranking = self.rank_layers(backend)
                qdq, decision = fallback(
                    self.model,
                    calib,
                    policy,
                    self.tune_feeds,
                    max_disagreement,
                    deployed,
                    ranking,
                    measure=self.measure,
                    float_precisions=candidates,
                )
        else:
            qdq, decision = quantize(self.model, calib, policy), None
        precision = decision.float_precision if decision else "fp32"
        ref = self.float_outputs("report")
        got = first_output(run_on(backend, qdq, self.report_feeds, float_precision=precision))
        sim = first_output(simulate(qdq, self.report_feeds))
        record = {
            "policy": policy.summary(),
            "calibration": {**calib.summary(), "data": self.calibration_source},
            "validation": self.validation_record(),
            "max_disagreement": max_disagreement,
            "measure": describe(self.measure),
            "agreement": self.measure(ref, got),
            "simulated_agreement": self.measure(ref, sim),
            "snr_db": round(snr_db(ref, got), 2),
            "cosine": round(cosine(ref, got), 6),
            "opset": {"source": self.source_opset, "quantised": default_opset(qdq)},
            "float_layers": decision.float_nodes if decision else [],
            "float_precision": precision,
            "fallback": decision.record() if decision else None,
        }
        agree = record["agreement"]
        record["passed"] = agree is None or 1 - agree <= max_disagreement + 1e-12
        return qdq, record


def split_validation(feeds: list[Feeds]) -> tuple[list[Feeds], list[Feeds]]:
    """Validation samples as (tune, report): every other sample each, so both span the set; one sample serves both."""
    if len(feeds) < 2:
        return feeds, feeds
    return feeds[0::2], feeds[1::2]


def _describe(source: Any) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"array {source.shape}"
    return f"{type(source).__name__} of {len(source)}" if hasattr(source, "__len__") else type(source).__name__


__all__ = [
    "DATASETS",
    "DEFAULT_MAX_DISAGREEMENT",
    "METHODS",
    "PTQ",
    "QATConfig",
    "Calibration",
    "FallbackResult",
    "LayerSensitivity",
    "QuantPolicy",
    "agreement",
    "calibrate",
    "cosine",
    "fallback",
    "first_output",
    "float_precisions",
    "layers",
    "load_feeds",
    "measure_on",
    "parse_budget",
    "policy_of",
    "prepare",
    "quantizable_nodes",
    "quantize",
    "run_on",
    "sensitivity",
    "simulate",
    "snr_db",
]
