"""Outputs that join tensors of different ranges, computed as their parts on integer-only targets.

A detector's head often ends in one Concat of unlike things: YOLOv8's output joins box coordinates in pixels
(0..320) with class scores (0..1). An integer-only device writes each output with one int8 scale and zero point,
so that scale is set by the pixels (about 1.3 per step) and every score rounds to zero: the model finds nothing.
Vendors' own model zoos cut such heads before the Concat and post-process each part with its own scale.

Here an integer-only backend asks the device for the Concat's inputs instead of its output (``concat_outputs``
finds them, ``split_outputs`` makes them the graph's outputs when the converter needs a graph), each part gets its
own scale, and ``join_outputs`` concatenates the parts in float on the host, so the target still reads and writes
the model's own tensors. The joined output is float whatever the device's I/O: its parts have different scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Joins = dict[str, dict[str, Any]]


def concat_outputs(model: Any) -> Joins:
    """The graph outputs made by a Concat of two or more computed tensors: ``{output: {"parts": [...], "axis": k}}``.

    A part that is a graph input, an initializer, another output or used twice in the Concat is left alone (the
    output is not split): cutting there would change what the device computes or name one tensor twice."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    outputs = [o.name for o in graph.output]
    taken = set(outputs)
    joins: Joins = {}
    for name in outputs:
        node = producers.get(name)
        if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        parts = [str(p) for p in node.input]
        if len(parts) < 2 or len(set(parts)) != len(parts) or any(p in constants or p in taken for p in parts):
            continue
        if any(p == "" or p not in producers for p in parts):
            continue
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), None)
        if axis is None:
            continue
        joins[name] = {"parts": parts, "axis": axis}
        taken.update(parts)
    return joins


def device_outputs(outputs: list[str], joins: Joins) -> list[str]:
    """The outputs the device computes, in the model's order with each joined output replaced by its parts."""
    names: list[str] = []
    for name in outputs:
        names.extend(joins[name]["parts"] if name in joins else [name])
    return names


def split_outputs(model: Any, joins: Joins) -> Any:
    """A copy of ``model`` whose outputs are ``device_outputs``: each joined output's Concat removed, its parts made
    graph outputs (typed and shaped as the output was, the joining axis left free)."""
    import onnx
    from onnx import helper

    if not joins:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    old = {o.name: o for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Concat" and len(n.output) == 1 and n.output[0] in joins)]
    del graph.node[:]
    graph.node.extend(keep)
    new = []
    for name in device_outputs([o.name for o in old.values()], joins):
        if name in old:
            new.append(old[name])
            continue
        joined = next(j for j, v in joins.items() if name in v["parts"])
        t = old[joined].type.tensor_type
        dims: list[Any] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
        if dims:  # a part has the joined output's shape but along the joining axis, which it does not say
            axis = int(joins[joined]["axis"])
            dims[axis % len(dims)] = f"{name}_{axis % len(dims)}"
        new.append(helper.make_tensor_value_info(name, t.elem_type, dims if t.HasField("shape") else None))
    del graph.output[:]
    graph.output.extend(new)
    return out


def join_outputs(outs: dict[str, np.ndarray], joins: Joins) -> dict[str, np.ndarray]:
    """The model's outputs from the device's: each joined output concatenated in float from its parts (which the
    caller has already dequantised), the others as they are."""
    if not joins:
        return outs
    result: dict[str, np.ndarray] = {}
    parts_of = {p: j for j, v in joins.items() for p in v["parts"]}
    for name, array in outs.items():
        joined = parts_of.get(name)
        if joined is None:
            result[name] = array
        elif joined not in result:
            spec = joins[joined]
            result[joined] = np.concatenate(
                [np.asarray(outs[p], np.float32) for p in spec["parts"]], axis=int(spec["axis"])
            )
    return result
