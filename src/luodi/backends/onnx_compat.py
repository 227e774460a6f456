"""Let an engine's converter read a model that a newer onnx wrote: the IR version lowered where that is safe.

onnx 1.23 writes IR version 14 while the converters' bundled ONNX readers stop at 13 (pnnx: "Unsupported model IR
version: 14, max supported IR version: 13"). The IR version is a file-format number: a model whose operator sets and
element types all exist in an older IR means the same there. This must never change what the model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# The IR version that introduced each element type (onnx/onnx.proto3): float8 in 9, 4-bit in 10, ...
_TYPE_SINCE_IR = {17: 9, 18: 9, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 12, 25: 13, 26: 13, 27: 14, 28: 14}


def _graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _element_types(model: Any) -> set[int]:
    """Every element type the model names: tensors, value infos, weights, Cast targets, constant attributes."""
    types: set[int] = set()
    for graph in _graphs(model.graph):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.type.HasField("tensor_type"):
                types.add(vi.type.tensor_type.elem_type)
        types.update(t.data_type for t in graph.initializer)
        types.update(t.values.data_type for t in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    types.add(attr.t.data_type)
                types.update(t.data_type for t in attr.tensors)
                if node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform") and attr.name in (
                    "to",
                    "dtype",
                ):
                    types.add(attr.i)
    return types


def min_ir_version(model: Any) -> int:
    """The oldest IR version that has every operator set and element type ``model`` uses."""
    from onnx import helper

    by_opset = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    by_type = max((_TYPE_SINCE_IR.get(t, 3) for t in _element_types(model)), default=3)
    return max(by_opset, by_type)


def with_ir_version_at_most(model: Any, max_ir: int) -> Any | None:
    """``model`` itself when its IR version is at most ``max_ir``; a copy with the IR version lowered to ``max_ir``
    when everything it uses exists there; None when it does not (the converter really cannot read it)."""
    if model.ir_version <= max_ir:
        return model
    if min_ir_version(model) > max_ir:
        return None
    lowered = type(model)()
    lowered.CopyFrom(model)
    lowered.ir_version = max_ir
    return lowered
