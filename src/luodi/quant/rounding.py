"""Error-compensating weight rounding (GPTQ: Frantar et al. 2023, after Optimal Brain Quantization): choose each
int8 Conv/Gemm weight's integer so that the layer's *output* error on the calibration inputs is small, instead of
rounding every weight to its nearest level on its own.

For a layer y = W x with the weights' scales fixed (the quantiser's per-channel scales), the output error is
dW C dW^T with C the covariance of the layer's input (patches, for a convolution). GPTQ quantises the input
features one at a time and moves the error each one leaves onto the features not yet quantised, weighted by
C^-1, so correlated features absorb it. The covariance is centred: the constant part of the error is what bias
correction (bias.py) removes afterwards, exactly, so the rounding spends its freedom on the part it cannot.

It changes which integers the QDQ graph stores, never the scales, zero points or graph, so an engine runs the
result like any other int8 graph. Compile-time only; numpy, with onnxruntime to tap the layer inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bias import LINEAR_OPS, _attr

POSITIONS = 4096  # input positions (over a batch) sampled per layer and run for its covariance
DAMP = 0.01  # of the mean diagonal, added to each covariance (GPTQ's dampening; keeps C invertible)
BLOCK = 128  # columns rounded between two updates of the columns after them (GPTQ's lazy batch)


def _patches(x: np.ndarray, node: Any, w_shape: Sequence[int]) -> np.ndarray | None:
    """[G, d, M]: the layer's input as G groups of d = C_in/G * kh * kw features over M samples x positions,
    in the order of ``W.reshape(C_out, d)``; None for a layer this does not handle."""
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or x.ndim != 2:
            return None
        return x.T[None].astype(np.float64)
    if x.ndim != 4 or len(w_shape) != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    stride = list(_attr(node, "strides", [1, 1]))
    dil = list(_attr(node, "dilations", [1, 1]))
    groups = int(_attr(node, "group", 1))
    kh, kw = int(w_shape[2]), int(w_shape[3])
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            r, s = i * dil[0], j * dil[1]
            taps.append(
                xp[:, :, r : r + stride[0] * (ho - 1) + 1 : stride[0], s : s + stride[1] * (wo - 1) + 1 : stride[1]]
            )
    p = np.stack(taps, 2).reshape(n, groups, (c // groups) * kh * kw, ho * wo)  # [N, G, d, P], d in (c, i, j) order
    return p.transpose(1, 2, 0, 3).reshape(groups, (c // groups) * kh * kw, n * ho * wo)


def input_covariances(model: Any, runs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Node name -> [G, d, d] centred covariance of each Conv/Gemm's input features over ``runs`` (float
    model, onnxruntime CPU)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in inits]
    wanted = sorted({n.input[0] for n in nodes})
    feeds_named = {vi.name for vi in model.graph.input}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    for name in wanted:
        if name not in outputs and name not in feeds_named:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    tapped = [t for t in wanted if t not in feeds_named]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    shapes = {n.name: numpy_helper.to_array(inits[n.input[1]]).shape for n in nodes}
    sums: dict[str, np.ndarray] = {}
    outer: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for feed in runs:
        got = dict(zip(tapped, sess.run(tapped, feed))) if tapped else {}
        got.update({k: v for k, v in feed.items() if k in wanted})
        for node in nodes:
            p = _patches(got[node.input[0]].astype(np.float32), node, shapes[node.name])
            if p is None:
                continue
            if p.shape[2] > POSITIONS:  # early layers: 100k positions a batch; a fixed sample of them is plenty
                p = p[:, :, np.sort(rng.choice(p.shape[2], POSITIONS, replace=False))]
            p = p.astype(np.float64)  # float32 sums lose the small variance of near-constant features
            sums[node.name] = sums.get(node.name, 0) + p.sum(2)
            # one 2-D product per group: numpy's batched matmul of a transposed view is ~20x slower than BLAS
            outer[node.name] = outer.get(node.name, 0) + np.stack([g @ g.T for g in p])
            count[node.name] = count.get(node.name, 0) + p.shape[2]
    out = {}
    for name, s in sums.items():
        mean = s / count[name]
        out[name] = outer[name] / count[name] - np.einsum("gd,ge->gde", mean, mean)
    return out


def gptq_factor(cov: np.ndarray) -> np.ndarray:
    """[G, d, d]: the upper Cholesky factor of the dampened covariance's inverse, which :func:`gptq_round` steps
    through. It depends on the covariance alone, so a calibration keeps it (``Calibration.gptq_factors``) for
    every quantisation of the same model (bias correction's second pass, each step of the fallback)."""
    d = cov.shape[1]
    h = cov + DAMP * np.maximum(np.einsum("gii->g", cov) / d, 1e-12)[:, None, None] * np.eye(d)[None]
    dead = np.einsum("gii->gi", cov) <= 0  # features that never vary: any rounding error there is a constant
    h[dead[:, :, None] & np.eye(d, dtype=bool)[None]] = 1.0
    return np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)


def gptq_round(
    w: np.ndarray,
    scale: np.ndarray,
    qmin: int,
    qmax: int,
    cov: np.ndarray | None = None,
    *,
    factor: np.ndarray | None = None,
    block: int = BLOCK,
) -> np.ndarray:
    """Integers for ``w`` [G, O, d] (G groups sharing a covariance ``cov`` [G, d, d], or its :func:`gptq_factor`)
    with per-row ``scale`` [G, O] in [qmin, qmax], chosen column by column with the remaining columns compensating
    (GPTQ). The compensation is applied within a block of columns as each is rounded and to the columns after the
    block in one matrix product when the block is done (GPTQ's lazy batch update: the same result, a BLAS product
    instead of a rank-one update of every later column per column)."""
    hinv = gptq_factor(cov) if factor is None else factor
    _, _, d = w.shape
    w = w.astype(np.float64).copy()
    s = scale.astype(np.float64)
    q = np.zeros(w.shape, dtype=np.int64)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        errors = np.empty(w.shape[:2] + (i2 - i1,))
        for i in range(i1, i2):
            col = w[:, :, i]
            qi = np.clip(np.round(col / s), qmin, qmax)
            q[:, :, i] = qi
            err = (col - qi * s) / hinv[:, i, i][:, None]
            w[:, :, i + 1 : i2] -= err[:, :, None] * hinv[:, None, i, i + 1 : i2]
            errors[:, :, i - i1] = err
        if i2 < d:
            w[:, :, i2:] -= np.matmul(errors, hinv[:, i1:i2, i2:])
    return q


def round_weights(
    qdq: Any,
    model: Any,
    covariances: dict[str, np.ndarray],
    qmin: int,
    qmax: int,
    factors: dict[str, np.ndarray] | None = None,
) -> tuple[Any, int]:
    """A copy of ``qdq`` whose symmetric int8 Conv/Gemm weights are GPTQ-rounded from ``model``'s float weights
    with the scales ``qdq`` already has; returns it and how many layers were re-rounded. ``factors`` caches each
    layer's :func:`gptq_factor` by node name across calls with the same ``covariances``."""
    factors = {} if factors is None else factors
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    inits = {i.name: i for i in out.graph.initializer}
    floats = {i.name: i for i in model.graph.initializer}
    float_nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in out.graph.node for o in n.output}
    done = 0
    for node in out.graph.node:
        if node.op_type not in LINEAR_OPS or node.name not in covariances or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        src = float_nodes.get(node.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or src is None:
            continue
        if src.input[1] not in floats or len(dq.input) < 2 or dq.input[1] not in inits:
            continue
        stored = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2] and np.any(numpy_helper.to_array(inits[dq.input[2]]) != 0):
            continue  # asymmetric weights: not handled
        w = numpy_helper.to_array(floats[src.input[1]]).astype(np.float64)
        cov = covariances[node.name]
        groups = cov.shape[0]
        if node.op_type == "Gemm":
            trans = bool(_attr(node, "transB", 0))
            rows = w if trans else w.T
            axis_ok = scale.size == 1 or _attr(dq, "axis", 1) == (0 if trans else 1)
        else:
            rows = w.reshape(w.shape[0], -1)
            axis_ok = scale.size == 1 or _attr(dq, "axis", 1) == 0
        if not axis_ok or rows.shape[0] % groups or rows.shape[1] != cov.shape[1]:
            continue
        per_row = np.broadcast_to(scale.reshape(-1), (rows.shape[0],))
        if node.name not in factors:
            factors[node.name] = gptq_factor(cov)
        w_groups, s_groups = rows.reshape(groups, -1, rows.shape[1]), per_row.reshape(groups, -1)
        q = gptq_round(w_groups, s_groups, qmin, qmax, factor=factors[node.name]).reshape(rows.shape)
        if node.op_type == "Gemm" and not bool(_attr(node, "transB", 0)):
            q = q.T
        q = q.reshape(stored.shape).astype(stored.dtype)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q, dq.input[0]))
        done += 1
    return out, done
