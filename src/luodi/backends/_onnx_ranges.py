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

import numpy as np

from ._ptq import BINS, histogram, mse_range


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
