"""Integer I/O at a QDQ graph's boundary: an int8 graph's float inputs and outputs made the integers the device sees.

A QDQ graph from luodi.quant takes float inputs and quantises each with a QuantizeLinear, and dequantises each output
with a DequantizeLinear. An integer-only device (an NPU) has no float at its boundary: :func:`integer_io` removes those
boundary nodes, so the graph reads and writes the quantised integers, and says the scale and zero point of each (what
Session uses to quantise float inputs and dequantise outputs, see docs/cli.md "int8 I/O at the boundary").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CompileError

Params = dict[str, tuple[float, int, str]]
"""Tensor name -> (scale, zero point, numpy integer dtype name)."""


def integer_io(model: Any) -> tuple[Any, Params, Params]:
    """A copy of the QDQ ``model`` with integer inputs and outputs; the (scale, zero point, dtype) of each.

    A graph input read by QuantizeLinear nodes must feed those only, with constant per-tensor scale and zero point (the
    same for each): the input becomes the integer input and the nodes go; an input no QuantizeLinear reads stays. An
    output produced by a DequantizeLinear with constant per-tensor parameters becomes that node's integer input; any
    other output stays as it is (e.g. the float output of a layer kept in float). A CompileError names the input or
    output that cannot be made integer.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    outputs = {o.name for o in graph.output}

    def consumers(name: str) -> list[Any]:
        return [n for n in graph.node if name in n.input]

    def params(node: Any, what: str) -> tuple[float, int, str]:
        if len(node.input) < 3 or not node.input[2]:
            raise CompileError(f"{what}: its {node.op_type} has no zero point, so its integer type is unknown")
        scale, zero = constants.get(node.input[1]), constants.get(node.input[2])
        if scale is None or zero is None:
            raise CompileError(f"{what}: the scale or zero point of its {node.op_type} is not a constant")
        if scale.size != 1 or zero.size != 1:
            raise CompileError(
                f"{what}: its {node.op_type} is per-axis ({scale.size} scales); integer I/O needs per-tensor parameters"
            )
        if zero.dtype not in (np.int8, np.uint8):
            raise CompileError(f"{what}: its {node.op_type} is {zero.dtype}, not int8 or uint8")
        return float(scale.reshape(())), int(zero.reshape(())), str(zero.dtype)

    def rename(old: str, new: str) -> None:
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
            for i, name in enumerate(n.output):
                if name == old:
                    n.output[i] = new

    def drop_value_info(name: str) -> None:
        for vi in [v for v in graph.value_info if v.name == name]:
            graph.value_info.remove(vi)

    ins: Params = {}
    for vi in graph.input:
        if vi.name in constants:
            continue
        users = consumers(vi.name)
        what = f"input '{vi.name}'"
        if not any(n.op_type == "QuantizeLinear" for n in users):
            continue  # an input no QuantizeLinear reads (indices, a float layer's) stays as it is
        others = sorted({n.op_type for n in users if n.op_type != "QuantizeLinear"})
        if others or vi.name in outputs:
            why = f"it also feeds {others}" if others else "it is also a graph output"
            raise CompileError(f"{what} cannot be an integer input: {why}, not only QuantizeLinear nodes")
        found = {params(q, what) for q in users}
        if len(found) > 1:
            raise CompileError(f"{what} is quantised with {len(found)} different scales or zero points")
        for q in users:
            if q.output[0] in outputs:
                raise CompileError(f"{what}: its quantised value is a graph output")
            graph.node.remove(q)
            drop_value_info(q.output[0])
            rename(q.output[0], vi.name)
        ins[vi.name] = found.pop()
        vi.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(ins[vi.name][2]))

    outs: Params = {}
    for vi in graph.output:
        dq = next((n for n in graph.node if vi.name in n.output), None)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue  # a float output (a layer kept in float) stays float
        what = f"output '{vi.name}'"
        found = params(dq, what)
        source = dq.input[0]
        if source in constants or source in {i.name for i in graph.input} or source in outputs:
            raise CompileError(f"{what}: the integer tensor it dequantises is not computed by the graph")
        graph.node.remove(dq)
        drop_value_info(source)
        rename(source, vi.name)
        outs[vi.name] = found
        vi.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(found[2]))
    if not ins and not outs:
        raise CompileError("the graph has no quantised input or output to make integer")
    return model, ins, outs
