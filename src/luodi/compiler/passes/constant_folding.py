"""Constant folding: every node whose inputs are all constants is computed once, at compile time.

Constant nodes become initializers, so weights are always graph constants. It never folds random
ops, quantise/dequantise pairs (they carry the int8 graph), control flow, or a node whose result
would be much larger than its inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Pass, PassContext
from .graph import initializer_arrays, opset

# Random ops must run each time; Q/DQ pairs are what an int8 engine reads, folding them loses the int8 graph.
_NEVER = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}
#: A folded result may be at most this many elements larger than its inputs (Expand/Tile/ConstantOfShape).
MAX_GROWTH = 1 << 20


class FoldConstants(Pass):
    name = "fold-constants"
    summary = "compute nodes whose inputs are all constants once (onnx reference evaluator); Constant -> initializer"

    def run(self, model: Any, ctx: PassContext) -> Any:
        import onnx
        from onnx import numpy_helper
        from onnx.reference import ReferenceEvaluator

        from ... import onnx_io

        graph = model.graph
        # The inferred element types keep folded values in the dtype the graph declares. The infer-shapes pass
        # before this one annotated them already: inference runs again only on a graph that has none.
        elem = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        if not elem:
            try:
                typed = onnx_io.infer_shapes(model)
                elem = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
            except Exception:  # folding is still exact without them; the dtype comes from the evaluator
                elem = {}
        known = initializer_arrays(graph)
        graph_outputs = {o.name for o in graph.output}
        opsets = {o.domain or "": o.version for o in model.opset_import}
        kept, folded = [], 0
        for node in graph.node:
            if not self._foldable(node, known, graph_outputs):
                kept.append(node)
                continue
            try:
                feeds = {n: known[n] for n in node.input if n}
                values = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
            except Exception:  # an op the evaluator cannot run stays in the graph for the engine
                kept.append(node)
                continue
            grown = sum(np.asarray(v).size for v in values) - sum(v.size for v in feeds.values())
            if grown > MAX_GROWTH:
                kept.append(node)
                continue
            for name, value in zip(node.output, values):
                if not name:
                    continue
                array = np.asarray(value)
                if elem.get(name):
                    array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(elem[name]), copy=False)
                known[name] = array
                graph.initializer.append(numpy_helper.from_array(array, name))
            folded += 1
        del graph.node[:]
        graph.node.extend(kept)
        ctx.notes.append(f"{folded} node(s) folded into constants (opset {opset(model)})")
        return model

    @staticmethod
    def _foldable(node: Any, known: dict[str, np.ndarray], graph_outputs: set[str]) -> bool:
        if node.op_type in _NEVER or node.domain not in ("", "ai.onnx"):
            return False
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS: control flow
            return False
        if any(o in graph_outputs for o in node.output):
            return False
        return all(n in known for n in node.input if n)
