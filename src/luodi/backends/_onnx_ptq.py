"""What luodi adds to the int8 quantisation of a toolkit that calibrates an ONNX graph itself (rknn-toolkit2), both
measured by running the float graph with onnxruntime on the compile's calibration samples (rknn.py calls these;
mnn.py calls ``correct_biases`` with ``rounded_symmetric``, MNN's int8 weights as luodi's scales make them):

- ``correct_biases``: the graph the toolkit is given, each Conv's and Gemm's float bias less the mean output error of
  its weights as the toolkit will round them (per output channel, asymmetric, 255 steps between the channel's min and
  max: measured on rknn-toolkit2 2.5, whose config files do not expose weights): E[conv(x, W_q - W)] =
  conv(E[x], W_q - W) with E[x] the layer's mean input (as luodi.quant.bias does on ONNX graphs, as the litert
  backend does on .tflite files). The toolkit then rounds the weights the same way (the bias is not in their
  scale), and the constant offset that rounded weights leave in each channel is gone.
- ``given_ranges``: ranges trained by QAT for the toolkit's tensors, tied groups kept tied.
- ``mse_ranges``: each intermediate activation's int8 range chosen by ``_ptq.mse_range`` on its histogram over the
  calibration samples, instead of the toolkit's min and max. The histogram spans the range the toolkit calibrated
  (values beyond fall in the end bins): where the toolkit fused an activation into the layer before it (Conv +
  Relu: the Conv's output has the Relu's range), values outside it are clipped on the device anyway. The model's
  inputs and outputs keep the toolkit's ranges (their int8 I/O specs; a clipped logit is a top-1 answer lost).

It must not import luodi.quant (a layer above).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._ptq import BINS, histogram, mse_range, tap_means


def _session(graph: Any, outputs: list[str]) -> Any:
    """An onnxruntime session of ``graph`` (a ModelProto, left as it is) giving ``outputs`` (float tensors) as the
    graph names them (no graph optimisation)."""
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


def mse_ranges(
    model: bytes, feeds: Sequence[dict[str, np.ndarray]], calibrated: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """For the tensors of ``calibrated`` (name -> the toolkit's (min, max)) that a node of the graph computes and
    that are not its inputs or outputs: the MSE-optimal int8 ranges over ``feeds`` (the calibration samples).

    Tensors the toolkit gave the very same range (a Concat's inputs and output, a MaxPool's, tied so that it moves
    int8 values through unchanged) get one range, on their histograms summed; such a group with a tensor that is
    not measured here (one of the model's inputs or outputs, or a tensor of the toolkit's own) keeps its range."""
    import onnx

    graph = onnx.ModelProto.FromString(model)
    ends = _ends(graph)
    produced = {o for n in graph.graph.node for o in n.output}
    groups = _tied(calibrated)
    wanted = [
        t
        for (lo, hi), members in groups.items()
        if hi > lo and all(m in produced and m not in ends for m in members)
        for t in members
    ]
    if not wanted or not feeds:
        return {}
    session = _session(graph, wanted)
    hists = {t: np.zeros(BINS) for t in wanted}
    for feed in feeds:
        for t, value in zip(wanted, session.run(wanted, feed)):
            hists[t] += histogram(value, *calibrated[t])
    out = {}
    for (lo, hi), members in groups.items():
        if members[0] not in hists:
            continue
        hist = sum(hists[m] for m in members)
        if hist.sum():
            chosen = mse_range(hist, np.linspace(lo, hi, BINS + 1), lo, hi)
            out.update({m: chosen for m in members})
    return out


def given_ranges(
    model: bytes, calibrated: dict[str, tuple[float, float]], given: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """The tensors of ``calibrated`` (name -> the toolkit's (min, max)) that get a range of ``given`` (e.g. trained by
    QAT), not the model's inputs or outputs: a group the toolkit tied (the same range) gets its first given member's
    range on every member, so that it stays tied."""
    import onnx

    ends = _ends(onnx.ModelProto.FromString(model))
    out = {}
    for members in _tied(calibrated).values():
        found = next((given[m] for m in members if m in given), None)
        if found is not None and not any(m in ends for m in members):
            out.update({m: (float(found[0]), float(found[1])) for m in members})
    return out


def _ends(graph: Any) -> set[str]:
    """The names of the graph's inputs and outputs (their ranges are the toolkit's: the int8 I/O)."""
    return {v.name for v in graph.graph.input} | {v.name for v in graph.graph.output}


def _tied(calibrated: dict[str, tuple[float, float]]) -> dict[tuple[float, float], list[str]]:
    """The toolkit's tensors grouped by their range: tensors it gave the very same range are tied."""
    groups: dict[tuple[float, float], list[str]] = {}
    for t, r in calibrated.items():
        groups.setdefault((float(r[0]), float(r[1])), []).append(t)
    return groups


def _rounded(w: np.ndarray) -> np.ndarray:
    """``w`` as the toolkit's int8 weights give it back: per output channel (axis 0), asymmetric, 255 steps from the
    channel's min to its max with zero exact (measured: a Conv whose small weights rounded to zero with symmetric
    weights keeps them, rounded up, on rknn-toolkit2 2.5)."""
    rows = w.reshape(w.shape[0], -1)
    lo, hi = np.minimum(rows.min(1), 0.0), np.maximum(rows.max(1), 0.0)
    shape = (-1,) + (1,) * (w.ndim - 1)
    scale = np.where(hi > lo, (hi - lo) / 255, 1.0)
    zero = np.round(-lo / scale) - 128
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (np.clip(np.round(w / scale) + zero, -128, 127) - zero) * scale


def rounded_symmetric(w: np.ndarray) -> np.ndarray:
    """``w`` as symmetric per-output-channel int8 weights give it back: max-abs / 127 steps, -127..127, halves away
    from zero (MNN's converter with a compression-params file, given these scales by luodi.backends._mnn_quant)."""
    rows = w.reshape(w.shape[0], -1)
    peak = np.abs(rows).max(1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
    q = w / scale
    return np.clip(np.sign(q) * np.floor(np.abs(q) + 0.5), -127, 127) * scale


def correct_biases(
    model: bytes, feeds: Sequence[dict[str, np.ndarray]], rounded: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[bytes, int]:
    """The graph with each Conv's and Gemm's (``transB``) constant bias less the mean output error of its weights as
    the toolkit rounds them (``rounded``: rknn-toolkit2's asymmetric rounding unless given), the mean input measured
    over ``feeds``; returns it and how many layers were corrected."""
    rounded = rounded or _rounded
    import onnx
    from onnx import numpy_helper

    graph = onnx.ModelProto.FromString(model)
    inits = {t.name: t for t in graph.graph.initializer}
    layers = []
    for node in graph.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not {*node.input[1:3]} <= set(inits):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (not attrs.get("transB") or attrs.get("transA")):
            continue
        if node.op_type == "Conv" and attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        layers.append((node, attrs))
    if not layers or not feeds:
        return model, 0
    shared = {n.input[2] for n, _ in layers}
    uses = {t: sum(list(n.input).count(t) for n in graph.graph.node) for t in shared}
    wanted = sorted({n.input[0] for n, _ in layers})
    session = _session(graph, wanted)
    means: dict[str, Any] = {}
    for feed in feeds:
        for t, v in zip(wanted, session.run(wanted, feed)):
            means[t] = means.get(t, 0) + np.asarray(v, np.float64).mean(0)  # over the batch axis
    fixed = 0
    for node, attrs in layers:
        if uses[node.input[2]] > 1:  # a bias shared by two layers cannot hold both corrections
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        x = means[node.input[0]] / len(feeds)
        corr = _mean_error(w, rounded(w) - w, x, node.op_type, attrs)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if corr is None or corr.shape != b.shape:
            continue
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((b - corr).astype(np.float32), node.input[2]))
        fixed += 1
    return graph.SerializeToString(), fixed


def _mean_error(w: np.ndarray, dw: np.ndarray, x: np.ndarray, op: str, attrs: dict[str, Any]) -> np.ndarray | None:
    """Per output channel, the layer's mean output error ``dw`` causes on the mean input ``x`` (no batch axis);
    None for a shape not handled."""
    if op == "Gemm":
        return dw @ x.reshape(-1) if dw.ndim == 2 and x.size == dw.shape[1] else None
    if w.ndim != 4 or x.ndim != 3:
        return None
    group = int(attrs.get("group", 1))
    cin, per = w.shape[1], w.shape[0] // group
    if cin * group != x.shape[0] or per * group != w.shape[0]:
        return None
    pads = attrs.get("pads", [0, 0, 0, 0])
    taps = tap_means(x, w.shape[2:], pads, attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1]))
    parts = [np.einsum("oihw,ihw->o", dw[g * per : (g + 1) * per], taps[g * cin : (g + 1) * cin]) for g in range(group)]
    return np.concatenate(parts)
