"""OpenVINO's NNCF as the quantiser of an openvino:int8 target (compile option ``quantizer="nncf"``).

luodi's own PTQ (luodi.quant) writes a QDQ ONNX graph that OpenVINO reads into FakeQuantize ops. With
``quantizer="nncf"`` the float graph is read instead, and ``nncf.quantize`` inserts the FakeQuantize ops itself,
calibrating on the compile's calibration samples (``CompileOptions.calibration``): OpenVINO's own post-training
quantisation, with its presets, bias correction and SmoothQuant. The artifact is the same kind of IR either way.

NNCF sends usage telemetry through openvino-telemetry unless its CI switch is set when it is first imported; luodi
imports it with that switch (and the CI marker the telemetry package checks) set for the import only, and replaces
its telemetry object by NNCF's own stub, so a compile sends nothing and writes no client-ID file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CompileError, MissingExtraError

QUANTIZERS = ("luodi", "nncf")
PRESETS = ("performance", "mixed")
BIAS_CORRECTIONS = ("full", "fast", "off")
# openvino's compile options that set nncf.quantize (each only with quantizer "nncf").
# What luodi passes NNCF when an option is not given (the record of an artifact states them).
DEFAULTS = {"preset": "performance", "bias_correction": "full"}
OPTIONS = ("nncf_preset", "nncf_bias_correction", "nncf_subset_size", "nncf_smooth_quant", "nncf_max_drop")


def import_nncf() -> Any:
    """The nncf module, imported with its telemetry off; MissingExtraError naming the extra when absent."""
    if "nncf" not in sys.modules:
        saved = {k: os.environ.get(k) for k in ("NNCF_CI", "CI")}
        os.environ["NNCF_CI"], os.environ["CI"] = "1", "true"
        try:
            import nncf  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError(
                f"openvino's quantizer 'nncf' needs the nncf package ({exc.msg}); install it with: "
                "pip install 'luodi[nncf]'"
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    import nncf
    from nncf.telemetry import decorator, wrapper

    stub = wrapper.NNCFTelemetryStub()
    wrapper.telemetry = stub
    decorator.telemetry = stub
    return nncf


def check_settings(extra: Mapping[str, Any]) -> dict[str, Any]:
    """openvino's ``nncf_*`` compile options, their values checked (the types are checked by the backend)."""
    out = {k[len("nncf_") :]: v for k, v in extra.items() if k in OPTIONS}
    if out.get("preset", "performance") not in PRESETS:
        raise CompileError(f"nncf_preset '{out['preset']}' is not one of {', '.join(PRESETS)}")
    if out.get("bias_correction", "full") not in BIAS_CORRECTIONS:
        raise CompileError(
            f"nncf_bias_correction '{out['bias_correction']}' is not one of {', '.join(BIAS_CORRECTIONS)}"
        )
    if out.get("subset_size", 1) < 1:
        raise CompileError("nncf_subset_size must be at least 1")
    if not 0 <= out.get("smooth_quant", 0) <= 1:
        raise CompileError("nncf_smooth_quant (SmoothQuant's alpha for convolutions) must be between 0 and 1")
    if not 0 <= out.get("max_drop", 0) < 1:
        raise CompileError("nncf_max_drop (a drop of top-1 agreement, e.g. 0.01) must be between 0 and 1")
    return out


def quantize(ov_model: Any, samples: Sequence[Mapping[str, np.ndarray]], extra: Mapping[str, Any]) -> Any:
    """``ov_model`` (read from the float ONNX graph) quantised by NNCF on ``samples`` (feed dicts by input name).

    ``extra``: openvino's compile options; the ``nncf_*`` ones set NNCF: ``nncf_preset`` ("performance": symmetric
    activations, NNCF's default; "mixed": asymmetric ones), ``nncf_bias_correction`` ("full", the default, which
    measured better on EfficientNet-Lite0 than NNCF's default "fast"; or "off"), ``nncf_subset_size`` (default:
    every sample), ``nncf_smooth_quant`` (SmoothQuant's alpha for convolutions; off when not given) and
    ``nncf_max_drop``: quantise with accuracy control (``nncf.quantize_with_accuracy_control``), keeping the layers
    that cost the most in float until top-1 agreement with the float model, measured on the calibration samples,
    drops by at most this much.
    """
    if not samples:
        raise CompileError("openvino's quantizer 'nncf' needs calibration samples; the compile gave none")
    settings = check_settings(extra)
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from openvino._offline_transformations import apply_moc_transformations

    # The ONNX frontend leaves each bias behind a ShapeOf/Broadcast subgraph that NNCF does not see as a bias (no
    # bias correction); the offline transformations (constant folding) leave Conv + Add, as NNCF expects.
    apply_moc_transformations(ov_model, cf=True)
    names = [p.get_any_name() for p in ov_model.inputs]
    items = [_ordered(s, names) for s in samples]
    settings = {**DEFAULTS, **settings}
    bias = settings["bias_correction"]
    advanced: dict[str, Any] = {"disable_bias_correction": bias == "off"}
    kw: dict[str, Any] = {
        "preset": getattr(nncf.QuantizationPreset, settings["preset"].upper()),
        "fast_bias_correction": bias == "fast",
        "subset_size": settings.get("subset_size", len(items)),
    }
    if "smooth_quant" in settings:
        kw["model_type"] = nncf.ModelType.TRANSFORMER  # NNCF runs SmoothQuant only for this model type
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(
            convolution=float(settings["smooth_quant"]), matmul=-1
        )
    kw["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    try:
        if "max_drop" not in settings:
            return nncf.quantize(ov_model, nncf.Dataset(items), **kw)
        return _with_accuracy_control(nncf, ov_model, items, float(settings["max_drop"]), kw)
    except nncf.errors.ValidationError as exc:  # a documented NNCF refusal, e.g. an empty model
        raise CompileError(f"nncf could not quantise the model: {exc}") from exc


def _ordered(sample: Mapping[str, np.ndarray], names: list[str]) -> Any:
    missing = [n for n in names if n not in sample]
    if missing:
        raise CompileError(f"calibration sample lacks input(s) {missing}")
    return sample[names[0]] if len(names) == 1 else tuple(sample[n] for n in names)


def _with_accuracy_control(nncf: Any, ov_model: Any, items: list, max_drop: float, kw: dict[str, Any]) -> Any:
    """nncf.quantize_with_accuracy_control judged by top-1 agreement with the float model on ``items``."""
    import openvino as ov

    float_model = ov.Core().compile_model(ov_model.clone(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference = [_top1(float_model, item) for item in items]

    def validate(compiled: Any, data: Any) -> float:  # NNCF passes the raw items: (index, sample) pairs
        same = [_top1(compiled, item) == reference[i] for i, item in data]
        return float(np.mean(np.concatenate(same)))

    indexed = nncf.Dataset(list(enumerate(items)), lambda pair: pair[1])
    if "advanced_parameters" in kw:  # the same settings under this function's name for them
        kw = dict(kw)
        kw["advanced_quantization_parameters"] = kw.pop("advanced_parameters")
    return nncf.quantize_with_accuracy_control(
        ov_model,
        indexed,
        indexed,
        validation_fn=validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        **kw,
    )


def _top1(compiled: Any, item: Any) -> np.ndarray:
    """The arg-max over the last axis of the first output for one sample (one entry per leading position)."""
    out = np.asarray(compiled(list(item) if isinstance(item, tuple) else [item])[0])
    return out.reshape(-1, out.shape[-1]).argmax(-1) if out.ndim else out.reshape(1)
