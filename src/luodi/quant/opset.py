"""The operator set a QDQ graph needs: models exported at an older opset are upgraded before any calibration.

onnxruntime's quantiser writes DequantizeLinear with a per-channel ``axis`` (opset 13); on an opset-9 graph that only
failed when the engine loaded the result, after the whole calibration. This upgrades with onnx's version converter, or
refuses at once; it must not change what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CompileError

QDQ_OPSET = 13
"""The first opset whose QuantizeLinear/DequantizeLinear take a per-channel ``axis``."""


def default_opset(model: Any) -> int:
    """The version of the default ("" / "ai.onnx") operator set the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def for_quantisation(model: Any, log: Callable[[str], None] | None = None) -> Any:
    """``model`` itself at opset 13 or later; else a copy upgraded to opset 13 by onnx's version converter; a
    CompileError saying what to do when the converter cannot upgrade it."""
    version = default_opset(model)
    if version >= QDQ_OPSET:
        return model
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, QDQ_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors/ValidationErrors naming the adapter
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise CompileError(
            f"int8 needs operator set {QDQ_OPSET} or later (per-channel DequantizeLinear), the model is opset "
            f"{version} and onnx's version converter could not upgrade it ({reason}); re-export the model with "
            f"opset {QDQ_OPSET} or later, or drop the int8 targets"
        ) from exc
    if log is not None:
        log(f"upgraded the graph from opset {version} to {QDQ_OPSET} for quantisation (onnx version converter)")
    return upgraded
