"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2): shift each quantised
Conv/Gemm's float bias by the mean output error its rounded weights cause, so the int8 layer is unbiased.

The error of a linear layer is linear in its input, so the mean error over the calibration data needs only the
mean input tensor: E[conv(x, W_q - W)] = conv(E[x], W_q - W). Padding borders are included exactly.

Why it matters: with BatchNorm folded, some depthwise kernels carry large weights that multiply a near-constant
input (a ReLU6 channel that is always saturated or always zero) and are then cancelled by a large bias; rounding
those weights leaves a constant offset that no later layer removes. Measured on EfficientNet-Lite0 (onnxruntime,
169 held-out photos): 81% -> 90.5% top-1 agreement with float. onnxruntime's quantiser has no bias correction,
hence this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends._ptq import tap_means

LINEAR_OPS = ("Conv", "Gemm")


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def mean_inputs(model: Any, runs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The mean over samples (batch axis) of each Conv/Gemm's data input, float64 without the batch axis."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    wanted = sorted({n.input[0] for n in model.graph.node if n.op_type in LINEAR_OPS})
    feeds_named = {vi.name for vi in model.graph.input}
    tapped = [n for n in wanted if n not in feeds_named]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    for name in tapped:
        if name not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in runs:
        got = dict(zip(tapped, sess.run(tapped, feed))) if tapped else {}
        got.update({k: v for k, v in feed.items() if k in wanted})
        for name, value in got.items():
            sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(0)
        count += len(next(iter(feed.values())))
    return {k: v / count for k, v in sums.items()}


def _dequantised_weights(qdq: Any) -> dict[str, np.ndarray]:
    """Node name -> the weights a QDQ graph's Conv/Gemm really uses (its weight DequantizeLinear, evaluated)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    out = {}
    for node in qdq.graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # kept in float
        w = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        has_zp = len(dq.input) > 2 and dq.input[2]
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if has_zp else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per-channel along `axis`
            shape = [1] * w.ndim
            shape[_attr(dq, "axis", 1)] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out[node.name] = (w - zero) * scale
    return out


def _tap_means(x: np.ndarray, node: Any, kernel: Sequence[int]) -> np.ndarray:
    """[C, *kernel]: for each input channel and kernel tap, the mean of the (padded) input that tap sees over
    all output positions. A 2-D Conv only (the layers the vision models here have)."""
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    return tap_means(x, kernel, pads, list(_attr(node, "strides", [1, 1])), list(_attr(node, "dilations", [1, 1])))


def _mean_error(node: Any, dw: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """Per output channel, the mean over data and positions of the layer's output error (None: not handled)."""
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or x.ndim != 1:
            return None
        return dw @ x if _attr(node, "transB", 0) else x @ dw
    if dw.ndim != 4 or x.ndim != 3 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    taps = _tap_means(x, node, dw.shape[2:])
    groups = int(_attr(node, "group", 1))
    per_group_out, per_group_in = dw.shape[0] // groups, dw.shape[1]
    corr = np.empty(dw.shape[0])
    for g in range(groups):
        rows = slice(g * per_group_out, (g + 1) * per_group_out)
        corr[rows] = np.einsum("ocij,cij->o", dw[rows], taps[g * per_group_in : (g + 1) * per_group_in])
    return corr


def correct_biases(model: Any, qdq: Any, means: dict[str, np.ndarray]) -> tuple[Any, int]:
    """A copy of the float ``model`` whose quantised (in ``qdq``) Conv/Gemm biases absorb the mean error of
    their rounded weights; quantising it again gives the bias-corrected QDQ graph (weights round the same way,
    as the bias does not enter their scales). Returns the model and how many layers were corrected."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    used = {}
    for node in out.graph.node:
        for name in node.input:
            used[name] = used.get(name, 0) + 1
    weights = _dequantised_weights(qdq)
    fixed = 0
    for node in out.graph.node:
        if node.name not in weights or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if node.input[0] not in means or used[node.input[2]] != 1:  # a shared bias cannot take two corrections
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        corr = _mean_error(node, weights[node.name] - w, means[node.input[0]])
        if corr is None:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]])
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((bias - corr).astype(bias.dtype), node.input[2]))
        fixed += 1
    return out, fixed
