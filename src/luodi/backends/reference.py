"""The float reference: onnx.reference.ReferenceEvaluator, op by op in numpy, slow and exact.

Verification compares every compiled target against this backend; it must stay simple and faithful.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import onnx_io
from ..errors import BackendError, CompileError, ModelError, UnsupportedOpError
from ..tensor import specs_from_onnx
from .base import Artifact, Backend, CompileOptions, Engine, LoadOptions


class ReferenceEngine(Engine):
    # ReferenceEvaluator keeps per-node state objects; serialise calls to be safe.
    thread_safe = False

    def __init__(self, model: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        inputs, outputs = specs_from_onnx(model)
        super().__init__(inputs, outputs)
        try:
            self._ev = ReferenceEvaluator(model, new_ops=_inference_ops())
        except Exception as exc:  # the evaluator reports missing ops as plain exceptions
            _translate(exc)
        self._out_names = [o.name for o in outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # onnx.reference computes both branches of e.g. Sigmoid's np.where; the discarded one overflows
        # on large inputs and numpy warns about a value nobody uses
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                results = self._ev.run(self._out_names, feeds)
            except Exception as exc:  # numpy's errors from inside an op (e.g. "negative dimensions" at a bad shape)
                shapes = {n: list(np.shape(a)) for n, a in feeds.items()}
                raise BackendError(
                    f"the reference evaluator cannot run the model on inputs {shapes}: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}; if a free dimension is "
                    "too small there, give shapes the model really runs at"
                ) from exc
        return {n: np.asarray(r) for n, r in zip(self._out_names, results)}


def _inference_ops() -> list[type]:
    """Ops whose onnx.reference implementation departs from the inference semantics engines run."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_batch_normalization import BatchNormalization_14, _batchnorm_test_mode

    class BatchNormalization(OpRun):
        # onnx's BatchNormalization-9 takes a 'momentum' attribute as a sign of training and normalises
        # with the batch's own statistics; exporters (paddle2onnx, PP-OCR) set it on inference graphs,
        # where every engine uses the running mean/var. Only training_mode=1 (opset 14+) means training.
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None):  # type: ignore[no-untyped-def]
            if training_mode:
                return BatchNormalization_14._run(self, x, scale, bias, mean, var, epsilon, momentum, training_mode)
            return (_batchnorm_test_mode(x, scale, bias, mean, var, epsilon=1e-5 if epsilon is None else epsilon),)

    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_25

    class DequantizeLinear(DequantizeLinear_25):
        # onnx 1.23's evaluator implements DequantizeLinear from opset 19 only, so a QDQ graph at opset 13-18 (what
        # onnxruntime's quantiser writes) could not be evaluated; 19+ only adds types and block/output attributes.
        op_domain = ""

    return [BatchNormalization, DequantizeLinear]


def _translate(exc: Exception) -> None:
    msg = str(exc)
    if "No implementation" in msg or "not implemented" in msg.lower():
        raise UnsupportedOpError(f"the reference evaluator cannot run this model: {msg}") from exc
    raise CompileError(f"the reference evaluator could not load the model: {msg}") from exc


class ReferenceBackend(Backend):
    name = "reference"
    in_memory = True
    int8_unsupported = "the reference is the float yardstick; a QDQ graph is simulated on onnxruntime instead"
    precisions = ("fp32",)
    module = "onnx"
    extra = "compiler"

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        ReferenceEngine(model)  # fail at compile time, not at first forward
        # The same bytes as the canonical model.onnx (and model.onnx.data over 2 GB): the package stores them once.
        return Artifact(self.name, "fp32", onnx_io.to_members(model))

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        data = artifact.files.get("model.onnx")
        if data is None:
            raise ModelError("reference artifact has no model.onnx")
        return ReferenceEngine(onnx_io.from_members(data, artifact.file))
