"""Shape inference: ONNX's own inference with data propagation, so later passes and engines see shapes.

It only annotates value_info; it never changes a node.
"""

from __future__ import annotations

from typing import Any

from ...errors import ModelError
from .base import Pass, PassContext


class InferShapes(Pass):
    name = "infer-shapes"
    summary = "annotate every tensor's shape and type (onnx.shape_inference, with data propagation)"

    def run(self, model: Any, ctx: PassContext) -> Any:
        from ... import onnx_io  # over 2 GB the graph is inferred without its weights

        del model.graph.value_info[:]  # stale entries from before a rewrite would mislead engines
        try:
            inferred = onnx_io.infer_shapes(model, check_type=True, data_prop=True)
        except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError here
            raise ModelError(f"ONNX shape inference failed on '{model.graph.name}': {exc}") from exc
        ctx.notes.append(f"{len(inferred.graph.value_info)} intermediate tensors annotated")
        return inferred
