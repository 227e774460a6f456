"""What luodi adds to ai-edge-quantizer's static int8 recipe for litert:int8: MSE-chosen activation ranges and bias
correction, both measured on the float .tflite over the compile's calibration samples (litert.py calls these).

- ``observe``: one pass of the float model with every intermediate tensor kept: each activation's value histogram
  (between the calibrator's min and max) and the mean input of each CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED.
- ``narrow``: each intermediate activation's range chosen by ``_ptq.mse_range`` instead of its min and max; the
  model's inputs and outputs keep their min and max (a clipped logit is the top-1 answer lost).
- ``correct_biases``: each quantised layer's float bias less the mean output error of its rounded int8 weights
  (E[conv(x, W_q - W)] = conv(E[x], W_q - W), as luodi.quant.bias does on ONNX graphs), read from a first
  quantisation; quantising the corrected float model again rounds the weights the same way.

It edits flatbuffers through ai-edge-litert's object API; it must not import luodi.quant (a layer above).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._ptq import BINS, histogram, mse_range, tap_means

LINEAR = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class Observed:
    """Per activation tensor (by name): its histogram over ``BINS`` bins from ``lo`` to ``hi``; per linear layer's
    data input (by tensor index): its mean over the samples (float64, no batch axis)."""

    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    means: dict[int, np.ndarray] = field(default_factory=dict)


def _op_names(model: Any) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [names.get(codes[op.opcodeIndex], "?") for op in model.subgraphs[0].operators]


def _linear_inputs(model: Any) -> list[int]:
    """Tensor indices of the data inputs of the first subgraph's biased linear layers."""
    ops = model.subgraphs[0].operators
    return sorted(
        {op.inputs[0] for op, name in zip(ops, _op_names(model)) if name in LINEAR and _bias_index(op) is not None}
    )


def _bias_index(op: Any) -> int | None:
    inputs = list(op.inputs)
    return inputs[2] if len(inputs) > 2 and inputs[2] >= 0 else None


def observe(
    data: bytes, feeds: Sequence[dict[int, np.ndarray]], ranges: dict[str, dict[str, np.ndarray]], skip: set[str]
) -> Observed:
    """Run the float model on ``feeds`` (input tensor index -> array) keeping every tensor; histogram each tensor
    named in ``ranges`` (the calibrator's min/max, by name) but those in ``skip``, and average the linear layers'
    inputs."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils

    with warnings.catch_warnings():  # keeping every tensor is what this pass is for, not a debugging leftover
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(model_content=bytes(data), num_threads=1, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    index = {d["name"]: d["index"] for d in interp.get_tensor_details() if np.dtype(d["dtype"]).kind == "f"}
    out = Observed()
    for name, r in ranges.items():
        if name in skip or name not in index:
            continue
        lo, hi = float(np.min(r["min"])), float(np.max(r["max"]))
        if hi > lo:
            out.lo[name], out.hi[name], out.histograms[name] = lo, hi, np.zeros(BINS)
    linear = _linear_inputs(flatbuffer_utils.read_model_from_bytearray(bytearray(data)))
    sums: dict[int, np.ndarray] = {}
    for feed in feeds:
        for i, value in feed.items():
            interp.set_tensor(i, value)
        interp.invoke()
        for name, hist in out.histograms.items():
            hist += histogram(interp.get_tensor(index[name]), out.lo[name], out.hi[name])
        for i in linear:
            x = interp.get_tensor(i).astype(np.float64)
            sums[i] = sums.get(i, 0) + x.mean(0)
    out.means = {i: v / max(1, len(feeds)) for i, v in sums.items()}
    return out


def narrow(ranges: dict[str, dict[str, np.ndarray]], observed: Observed) -> int:
    """Replace each histogrammed tensor's min and max in ``ranges`` by its MSE-optimal int8 range; how many."""
    changed = 0
    for name, hist in observed.histograms.items():
        edges = np.linspace(observed.lo[name], observed.hi[name], BINS + 1)
        lo, hi = mse_range(hist, edges, observed.lo[name], observed.hi[name])
        r = ranges[name]
        r["min"], r["max"] = np.full_like(r["min"], lo), np.full_like(r["max"], hi)
        changed += 1
    return changed


def _dequantised(tensor: Any, buffers: list[Any]) -> np.ndarray | None:
    """The float values of an int8 constant tensor of a quantised model (None: not an int8 constant)."""
    from ai_edge_litert import schema_py_generated as schema

    data = buffers[tensor.buffer].data
    q = tensor.quantization
    if tensor.type != schema.TensorType.INT8 or data is None or q is None or q.scale is None:
        return None
    w = np.frombuffer(bytes(np.asarray(data, np.uint8)), np.int8).reshape(tensor.shape).astype(np.float64)
    scale = np.atleast_1d(np.asarray(q.scale, np.float64))
    zero = np.atleast_1d(np.asarray(q.zeroPoint if q.zeroPoint is not None else 0, np.float64))
    if scale.size > 1:
        shape = [1] * w.ndim
        shape[q.quantizedDimension] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (w - zero) * scale


def _float_constant(tensor: Any, buffers: list[Any]) -> np.ndarray | None:
    from ai_edge_litert import schema_py_generated as schema

    data = buffers[tensor.buffer].data
    if tensor.type != schema.TensorType.FLOAT32 or data is None:
        return None
    return np.frombuffer(bytes(np.asarray(data, np.uint8)), np.float32).reshape(tensor.shape)


def _same_pads(size: int, k: int, stride: int, dilation: int, same: bool) -> tuple[int, int]:
    """TFLite's padding (before, after) along one axis: SAME pads the total it needs, the odd one after."""
    if not same:
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (k - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_taps(x: np.ndarray, kernel: Sequence[int], options: Any) -> np.ndarray:
    """[kh, kw, C]: tap means of an NHWC layer's mean input ``x`` ([H, W, C]) under its TFLite options."""
    from ai_edge_litert import schema_py_generated as schema

    same = options.padding == schema.Padding.SAME
    strides = (options.strideH, options.strideW)
    dilations = (options.dilationHFactor, options.dilationWFactor)
    top, bottom = _same_pads(x.shape[0], kernel[0], strides[0], dilations[0], same)
    left, right = _same_pads(x.shape[1], kernel[1], strides[1], dilations[1], same)
    taps = tap_means(x.transpose(2, 0, 1), kernel, (top, left, bottom, right), strides, dilations)
    return taps.transpose(1, 2, 0)


def _mean_error(kind: str, dw: np.ndarray, x: np.ndarray, options: Any) -> np.ndarray | None:
    """Per output channel, the layer's mean output error over the data and positions (None: a shape not handled)."""
    if kind == "FULLY_CONNECTED":
        if dw.ndim != 2 or x.shape[-1] != dw.shape[1]:
            return None
        return dw @ x.reshape(-1, dw.shape[1]).mean(0)
    if dw.ndim != 4 or x.ndim != 3:
        return None
    taps = _conv_taps(x, dw.shape[1:3], options)
    if kind == "CONV_2D":  # weights [O, kh, kw, I]; grouped when the input has a multiple of I channels
        cin = dw.shape[3]
        groups = taps.shape[2] // cin
        if groups * cin != taps.shape[2] or dw.shape[0] % groups:
            return None
        per = dw.shape[0] // groups
        parts = [
            np.einsum("ohwi,hwi->o", dw[g * per : (g + 1) * per], taps[..., g * cin : (g + 1) * cin])
            for g in range(groups)
        ]
        return np.concatenate(parts)
    mult = dw.shape[3] // taps.shape[2]  # DEPTHWISE_CONV_2D: weights [1, kh, kw, C * multiplier]
    if mult * taps.shape[2] != dw.shape[3]:
        return None
    return np.einsum("hwo,hwo->o", dw[0], np.repeat(taps, mult, axis=2))


def correct_biases(data: bytes, quantised: bytes, means: dict[int, np.ndarray]) -> tuple[bytes, int]:
    """The float model ``data`` with each biased linear layer that ``quantised`` made int8 given the bias
    ``b - conv(E[x], W_q - W)``; returns the model and how many layers were corrected."""
    from ai_edge_litert.tools import flatbuffer_utils

    fm = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    qm = flatbuffer_utils.read_model_from_bytearray(bytearray(quantised))
    fs, qs = fm.subgraphs[0], qm.subgraphs[0]
    # the quantiser keeps the operators and their tensors' names; a name given twice matches nothing
    produced = [(qs.tensors[op.outputs[0]].name, op) for op in qs.operators if len(op.outputs)]
    times = Counter(name for name, _ in produced)
    by_output = {name: op for name, op in produced if times[name] == 1}
    uses: dict[int, int] = {}
    for sub in fm.subgraphs:
        for t in sub.tensors:
            uses[t.buffer] = uses.get(t.buffer, 0) + 1
    fixed = 0
    for op, kind in zip(fs.operators, _op_names(fm)):
        bias_index = _bias_index(op)
        if kind not in LINEAR or bias_index is None or op.inputs[0] not in means or not len(op.outputs):
            continue
        qop = by_output.get(fs.tensors[op.outputs[0]].name)
        if qop is None or len(qop.inputs) < 2:
            continue
        w = _float_constant(fs.tensors[op.inputs[1]], fm.buffers)
        wq = _dequantised(qs.tensors[qop.inputs[1]], qm.buffers)
        bias_tensor = fs.tensors[bias_index]
        bias = _float_constant(bias_tensor, fm.buffers)
        if w is None or wq is None or bias is None or w.shape != wq.shape:
            continue
        corr = _mean_error(kind, wq - w, means[op.inputs[0]], op.builtinOptions)
        if corr is None or corr.shape != bias.shape:
            continue
        if uses[bias_tensor.buffer] > 1:  # a bias buffer shared with another tensor gets one of its own
            from ai_edge_litert import schema_py_generated as schema

            uses[bias_tensor.buffer] -= 1
            fm.buffers.append(schema.BufferT())
            bias_tensor.buffer = len(fm.buffers) - 1
            uses[bias_tensor.buffer] = 1
        new = (bias.astype(np.float64) - corr).astype(np.float32)
        fm.buffers[bias_tensor.buffer].data = np.frombuffer(new.tobytes(), np.uint8)
        fixed += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fm)), fixed
