"""Calibration: run float data through the model and choose each activation's int8 range (the observers).

minmax, percentile and entropy are onnxruntime.quantization's calibrators; mse is ours (ORT has none), computed
on the histograms ORT's percentile calibrator collects. It chooses ranges only; ptq.py writes the QDQ graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends._ptq import MSE_CANDIDATES, mse_range
from ..errors import CompileError, InputError
from .bias import mean_inputs
from .data import Feeds, batches, progress
from .policy import QuantPolicy

METHODS = ("minmax", "percentile", "entropy", "mse")
# Samples per calibrator.collect_data call. ORT's histogram calibrators keep every intermediate tensor of every
# sample of one call in memory before binning (EfficientNet-Lite0: ~40 MB a sample), so feeding it in chunks
# keeps memory flat; the histograms merge across calls. It also lets the progress bar move.
CHUNK = 8
PERCENTILE = 99.999


@dataclass
class Calibration:
    """The activation ranges chosen by one observer: ``ranges`` is onnxruntime's ``TensorsData``."""

    method: str
    ranges: Any
    samples: int
    # mean input of every Conv/Gemm over the samples, for bias correction (see bias.py); None: not measured
    input_means: dict[str, np.ndarray] | None = None
    # centred covariance of every Conv/Gemm's input features, for GPTQ weight rounding (rounding.py)
    input_covariances: dict[str, np.ndarray] | None = None
    # how many of the ranges quantisation-aware training chose (method "qat", see qat.py); the rest are min-max
    trained: int = 0
    # each layer's GPTQ factor of its covariance, filled by the first quantisation that rounds it (rounding.py)
    gptq_factors: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        out = {"method": self.method, "samples": self.samples, "tensors": len(list(self.ranges.keys()))}
        if self.trained:
            out["trained_ranges"] = self.trained
        return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def _ort_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "mse": CalibrationMethod.Percentile,  # only its value histograms are used; see _mse_ranges
    }[method]


def calibrate(
    model: Any,
    feeds: Sequence[Feeds],
    method: str = "minmax",
    policy: QuantPolicy | None = None,
    batch: int = 8,
) -> Calibration:
    """Run ``feeds`` through ``model`` on onnxruntime and choose activation ranges with ``method``."""
    from onnxruntime.quantization.calibrate import create_calibrator

    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    if not feeds:
        raise InputError("calibration needs at least one sample; the calibration data gave none")
    symmetric = bool(policy and policy.activations.symmetric)
    options: dict[str, Any] = {"symmetric": symmetric}
    if method == "percentile":
        options["percentile"] = PERCENTILE
    dynamic_batch = _batch_is_symbolic(model)
    runs = batches(feeds, batch) if dynamic_batch else list(feeds)
    step = max(1, CHUNK // batch) if dynamic_batch else CHUNK
    chunks = [runs[i : i + step] for i in range(0, len(runs), step)]
    with tempfile.TemporaryDirectory(prefix="luodi-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints a line per collect_data call
                calibrator = create_calibrator(
                    path,
                    list(policy.ops) if policy else None,
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=_ort_method(method),
                    extra_options=options if method != "mse" else {"symmetric": False},
                )
                calibrator.set_execution_providers(["CPUExecutionProvider"])
                for chunk in progress(chunks, f"calibrating ({method}) on {len(feeds)} samples"):
                    calibrator.collect_data(_Reader(chunk))
                if method == "mse":
                    ranges = _mse_ranges(calibrator.collector.histogram_dict, policy)
                else:
                    ranges = calibrator.compute_data()
        except (RuntimeError, ValueError) as exc:
            raise CompileError(f"calibration ({method}) failed on onnxruntime: {exc}") from exc
        finally:
            logging.getLogger().setLevel(quiet)
    means = mean_inputs(model, runs) if policy is None or policy.bias_correction else None
    covariances = None
    if policy is None or policy.weight_rounding == "gptq":
        from .rounding import input_covariances

        covariances = input_covariances(model, runs)
    return Calibration(method, ranges, len(feeds), means, covariances)


def _batch_is_symbolic(model: Any) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or not (dims[0].dim_param or dims[0].dim_value == 0):
            return False
    return True


def _mse_ranges(histograms: dict[str, tuple], policy: QuantPolicy | None) -> Any:
    """Per tensor, the clipping range that minimises the expected quantisation error on its value histogram:
    rounding noise (scale^2 / 12) inside the range, squared clipping distance outside it."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    act = policy.activations if policy else None
    levels = 2 ** (act.bits if act else 8) - 1
    symmetric = bool(act and act.symmetric)
    out = {}
    for name, (hist, edges, lo_seen, hi_seen, *_rest) in histograms.items():
        lo, hi = mse_range(hist, edges, lo_seen, hi_seen, levels, symmetric, MSE_CANDIDATES)
        out[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
    return TensorsData(CalibrationMethod.Percentile, out)
