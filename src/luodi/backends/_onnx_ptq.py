"""luodi's int8 activation ranges for a toolkit that calibrates an ONNX graph itself (rknn): each tensor's range
chosen by ``_ptq.mse_range`` on its value histogram over the calibration samples, measured by running the float ONNX
graph with onnxruntime with those tensors made outputs.

The histogram of a tensor spans the range the toolkit calibrated (its min and max, values beyond fall in the end
bins): where the toolkit fused an activation into the layer before it (Conv + Relu: the Conv's output has the
Relu's range), the tensor's values outside that range are clipped on the device anyway, and the MSE range is chosen
among what the device can represent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._ptq import BINS, histogram, mse_range, tap_means

WEIGHT_BINS = 512


def mse_ranges(
    model: bytes, feeds: Sequence[dict[str, np.ndarray]], calibrated: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """For each tensor of ``calibrated`` (name -> the toolkit's (min, max)) that the graph computes in float and that
    is not one of its inputs or outputs: the MSE-optimal int8 range over ``feeds`` (the calibration samples)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.ModelProto.FromString(model)
    ends = {v.name for v in graph.graph.input} | {v.name for v in graph.graph.output}
    produced = {o for n in graph.graph.node for o in n.output}
    wanted = [t for t, (lo, hi) in calibrated.items() if t in produced and t not in ends and hi > lo]
    if not wanted or not feeds:
        return {}
    del graph.graph.output[:]
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as the graph names it
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    hists = {t: np.zeros(BINS) for t in wanted}
    for feed in feeds:
        for t, value in zip(wanted, session.run(wanted, feed)):
            if np.asarray(value).dtype.kind == "f":
                hists[t] += histogram(value, *calibrated[t])
    out = {}
    for t, hist in hists.items():
        lo, hi = calibrated[t]
        if hist.sum():
            out[t] = mse_range(hist, np.linspace(lo, hi, BINS + 1), lo, hi)
    return out


def _session(graph: Any, outputs: list[str]) -> Any:
    import onnx
    import onnxruntime as ort

    g = onnx.ModelProto()
    g.CopyFrom(graph)
    del g.graph.output[:]
    g.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _weight_bounds(w: np.ndarray, mse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 0), the int8 weight range (low, high), zero inside it: the channel's min and max, or
    (``mse``) the range with the least expected squared error on its values."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    lo, hi = np.minimum(rows.min(1), 0.0), np.maximum(rows.max(1), 0.0)
    if mse:
        for o, row in enumerate(rows):
            if hi[o] > lo[o]:
                hist, edges = np.histogram(row, bins=WEIGHT_BINS, range=(lo[o], hi[o]))
                lo[o], hi[o] = mse_range(hist, edges, lo[o], hi[o])
    return lo, hi


def _rounded(w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``w`` as the toolkit's int8 weights give it back: per output channel, asymmetric, 255 steps from ``lo`` to
    ``hi`` with zero exact (measured: a Conv whose small weights round up, not to zero, on rknn-toolkit2 2.5)."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    scale = np.where(hi > lo, (hi - lo) / 255, 1.0)
    zero = np.round(-lo / scale) - 128
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (np.clip(np.round(w / scale) + zero, -128, 127) - zero) * scale


def prepare(
    model: bytes, feeds: Sequence[dict[str, np.ndarray]], clip: bool = True, correct: bool = True
) -> tuple[bytes, dict[str, int]]:
    """The float graph for the toolkit: each Conv's and Gemm's weights clipped per output channel to their
    MSE-optimal symmetric int8 bound (``clip``; the toolkit's per-channel min/max then gives that scale), and each
    one's bias less the mean output error of the weights as the toolkit rounds them (``correct``: bias
    correction, E[conv(x, W_q - W)] = conv(E[x], W_q - W), the mean input measured over ``feeds``)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.ModelProto.FromString(model)
    inits = {t.name: t for t in graph.graph.initializer}
    layers = []
    for node in graph.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (not attrs.get("transB") or attrs.get("transA")):
            continue
        layers.append((node, attrs))
    stats = {"clipped": 0, "corrected": 0}
    means: dict[str, np.ndarray] = {}
    if correct and feeds:
        wanted = sorted({n.input[0] for n, _ in layers})
        session = _session(graph, wanted)
        for feed in feeds:
            for t, v in zip(wanted, session.run(wanted, feed)):
                means[t] = means.get(t, 0) + np.asarray(v, np.float64).mean(0)
        means = {t: v / len(feeds) for t, v in means.items()}
    for node, attrs in layers:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        lo, hi = _weight_bounds(w, clip)
        shape = (-1,) + (1,) * (w.ndim - 1)
        clipped = np.clip(w, lo.reshape(shape), hi.reshape(shape))
        if clip:
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(clipped.astype(np.float32), node.input[1]))
            stats["clipped"] += 1
        if not correct or len(node.input) < 3 or node.input[2] not in inits or node.input[0] not in means:
            continue
        dw = _rounded(clipped, lo, hi) - w
        x = means[node.input[0]]
        if node.op_type == "Gemm":
            corr = dw @ x.reshape(-1)
        else:
            if w.ndim != 4 or x.ndim != 3:
                continue
            k = w.shape[2:]
            pads = attrs.get("pads", [0, 0, 0, 0])
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
                continue
            taps = tap_means(x, k, pads, attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1]))
            group = int(attrs.get("group", 1))
            cin, per = w.shape[1], w.shape[0] // group
            corr = np.concatenate(
                [
                    np.einsum("oihw,ihw->o", dw[g * per : (g + 1) * per], taps[g * cin : (g + 1) * cin])
                    for g in range(group)
                ]
            )
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if corr.shape != b.shape:
            continue
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((b - corr).astype(np.float32), node.input[2]))
        stats["corrected"] += 1
    return graph.SerializeToString(), stats
