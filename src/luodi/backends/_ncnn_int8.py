"""ncnn:int8 without ncnn2table/ncnn2int8: the scales written into an fp32 model, and ncnn quantises at load.

ncnn's int8 tools are in no wheel or Debian 12 package. What they produce is an fp32-shaped model whose
Convolution, ConvolutionDepthWise and InnerProduct layers say ``8=int8_scale_term`` in the .param and carry, in the
.bin right after their weights (and bias), the weights' int8 scales (one per output channel; per group for a
depthwise) and the scale of their input blob. Given float weights and those scales, ncnn 1.0.20261020 quantises
the weights itself when the layer's pipeline is created with ``opt.use_int8_inference`` ("runtime quantize the
weight data" in its layers; measured: a 3x3 Convolution's output moves from 1e-6 of the float result to 0.9%,
i.e. it ran in int8). So luodi writes exactly that, from pnnx's fp32 model:

- the .bin's layout is read from ncnn itself: the fp32 model is loaded once through a DataReader that records
  every read (offset, size), so each layer's blobs are known without a table of every layer type's layout; each
  int8 layer's reads are its weight (a 4-byte storage tag, 0 = fp32, then the floats) and its bias, matched in
  .param order;
- weight scales are ncnn2int8's: 127 / max |w| per output channel;
- input-blob scales are calibrated on the compile's samples, run through the fp32 model by ncnn itself
  (each int8 layer's bottom blob extracted), by the compile option ``ranges``: ``mse`` (the default) is the
  threshold t with the least expected squared error on the blob's histogram of |x| (``_ptq.mse_range``,
  symmetric, 254 steps: rounding noise inside [-t, t], squared clipping distance outside it), ``percentile`` the
  99.999th percentile of |x|, ``maxabs`` max |x| (ncnn2table's max-abs method, the behaviour before). A blob
  that is one of the model's inputs keeps max |x| (a clipped input is information lost before the first layer);
  the scale written is 127 / t;
- bias correction (compile option ``bias_correction``, true by default): each int8 layer's bias less the mean
  output error of its weights as ncnn will round them at load (``round(w * s)`` half away from zero in float32,
  clamped to [-127, 127], per output channel or group), E[conv(x, W_q - W)] = conv(E[x], W_q - W) with E[x] the
  mean of the layer's input blob over the samples (as luodi.quant.bias does on ONNX graphs); a layer without a
  bias, or with padding other than zeros, keeps its weights' error.

The scales are symmetric int8 per tensor for activations and per channel for weights, as ncnn computes. Layers
with dynamic weights (``19=1``) stay in float.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import numpy as np

from ..errors import CompileError
from ._ptq import BINS, histogram, mse_range, tap_means

RANGES = ("mse", "percentile", "maxabs")  # the compile option ``ranges``; the first is the default
PERCENTILE = 99.999
_STEPS = 254  # symmetric int8: [-127, 127]
# type -> the int8_scale_term luodi writes (1 for a depthwise: one weight scale per group)
INT8_LAYERS = {"Convolution": 2, "ConvolutionDepthWise": 1, "InnerProduct": 2}
_FP32_TAG = 0
# type -> the param ids of bias_term and weight_data_size (num_output is 0 in all three)
_WEIGHT_PARAMS = {"Convolution": ("5", "6"), "ConvolutionDepthWise": ("5", "6"), "InnerProduct": ("1", "2")}


def _capsule_pointer(capsule: Any) -> int:
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))


def read_log(ncnn: Any, param_path: str, weights: bytes) -> list[tuple[int, int]]:
    """Every (offset, size) ncnn reads from ``weights`` while it loads the model, in order."""

    class Recorder(ncnn.DataReader):
        def __init__(self) -> None:
            super().__init__()
            self.pos, self.log = 0, []

        def scan(self, fmt: Any, p: Any) -> int:
            return 0

        def read(self, buf: Any, size: int) -> int:
            size = int(size)
            chunk = weights[self.pos : self.pos + size]
            if len(chunk) < size:
                return 0
            ctypes.memmove(_capsule_pointer(buf), chunk, size)
            self.log.append((self.pos, size))
            self.pos += size
            return size

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    if net.load_param(param_path) != 0:
        raise CompileError("ncnn:int8: ncnn could not read pnnx's model.param")
    recorder = Recorder()
    if net.load_model(recorder) != 0 or recorder.pos != len(weights):
        raise CompileError("ncnn:int8: ncnn did not read pnnx's model.bin to its end; cannot place int8 scales")
    net.clear()
    return recorder.log


def int8_layers(layers: list[tuple[str, str, list[str], list[str]]], param_text: str) -> list[dict[str, Any]]:
    """The layers that run in int8, in .param order: type, name, input blob, line index and their weight params."""
    lines = param_text.splitlines()
    found = []
    for ltype, name, bottoms, _ in layers:
        if ltype not in INT8_LAYERS:
            continue
        index = next(i for i, ln in enumerate(lines) if ln.split()[:2] == [ltype, name])
        params = dict(tok.split("=", 1) for tok in lines[index].split() if re.match(r"^-?\d+=", tok))
        bias_id, size_id = _WEIGHT_PARAMS[ltype]
        if params.get("19", "0") != "0" or params.get("8", "0") != "0":  # dynamic weights, or already int8
            continue
        found.append(
            {
                "type": ltype,
                "name": name,
                "bottom": bottoms[0],
                "line": index,
                "num_output": int(params.get("0", "0")),
                "bias": params.get(bias_id, "0") != "0",
                "weights": int(params.get(size_id, "0")),
                "group": int(params.get("7", "1")),
                "params": params,
            }
        )
    return found


def place(layers: list[dict[str, Any]], log: list[tuple[int, int]], weights: bytes) -> None:
    """Find each int8 layer's weight and bias reads in ``log`` (in order); set its ``end`` offset and float weights."""
    at = 0
    for layer in layers:
        want = [4, layer["weights"] * 4] + ([layer["num_output"] * 4] if layer["bias"] else [])
        while at + len(want) <= len(log):
            sizes = [s for _, s in log[at : at + len(want)]]
            tag = int.from_bytes(weights[log[at][0] : log[at][0] + 4], "little")
            if sizes == want and tag == _FP32_TAG:
                break
            at += 1
        else:
            raise CompileError(f"ncnn:int8: layer {layer['name']}'s fp32 weights were not found in model.bin")
        offset, size = log[at + 1]
        layer["w"] = np.frombuffer(weights, np.float32, size // 4, offset)
        if layer["bias"]:
            layer["bias_at"] = log[at + 2][0]
        last = log[at + len(want) - 1]
        layer["end"] = last[0] + last[1]
        at += len(want)


def weight_scales(layer: dict[str, Any]) -> np.ndarray:
    """ncnn2int8's per output channel (per group for a depthwise) scale: 127 / max |w|, 1 for an all-zero row."""
    rows = layer["group"] if layer["type"] == "ConvolutionDepthWise" else layer["num_output"]
    peak = np.abs(layer["w"].reshape(rows, -1)).max(axis=1)
    return np.where(peak > 0, 127.0 / np.maximum(peak, 1e-30), 1.0).astype(np.float32)


def quantised_weights(layer: dict[str, Any]) -> np.ndarray:
    """The weights ncnn computes with once it has quantised them at load, as float64 in the .bin's layout: each
    row (output channel; group for a depthwise) ``clamp(round(w * s), -127, 127) / s``, the product in float32 and
    rounded half away from zero as ncnn's float2int8 does."""
    scales = weight_scales(layer)
    w = layer["w"].reshape(len(scales), -1)
    v = (w * scales[:, None]).astype(np.float64)  # float32 product, as ncnn's Quantize computes it
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127)
    return (q / scales[:, None].astype(np.float64)).reshape(-1)


def _pads(layer: dict[str, Any], height: int, width: int) -> tuple[int, int, int, int] | None:
    """ONNX-order (top, left, bottom, right) zero padding of a Convolution/ConvolutionDepthWise (None: not zeros)."""
    p = layer["params"]
    if float(p.get("18", "0")) != 0:  # pad_value
        return None
    kw = int(p.get("1", "0"))
    kh, dw, sw = int(p.get("11", kw)), int(p.get("2", "1")), int(p.get("3", "1"))
    dh, sh = int(p.get("12", dw)), int(p.get("13", sw))
    left = int(p.get("4", "0"))
    top = int(p.get("14", left))
    right, bottom = int(p.get("15", left)), int(p.get("16", top))
    if left in (-233, -234):  # SAME_UPPER / SAME_LOWER: the total a stride needs, the odd one after (before)
        pads = []
        for size, k, d, st in ((height, kh, dh, sh), (width, kw, dw, sw)):
            total = max((-(-size // st) - 1) * st + d * (k - 1) + 1 - size, 0)
            pads.append((total // 2, total - total // 2) if left == -233 else (total - total // 2, total // 2))
        return pads[0][0], pads[1][0], pads[0][1], pads[1][1]
    if min(left, top, right, bottom) < 0:
        return None
    return top, left, bottom, right


def mean_error(layer: dict[str, Any], mean: np.ndarray) -> np.ndarray | None:
    """Per output channel, the mean over the samples and positions of the layer's output error from ncnn's weight
    rounding, given the mean of its input blob (None: a layout not handled; that layer keeps its bias)."""
    dw = quantised_weights(layer) - layer["w"].astype(np.float64)
    out = layer["num_output"]
    if layer["type"] == "InnerProduct":
        dw = dw.reshape(out, -1)
        if mean.size == dw.shape[1]:
            return dw @ mean.reshape(-1)
        if mean.shape[-1] == dw.shape[1]:  # a 2-D input: one product per row
            return dw @ mean.reshape(-1, dw.shape[1]).mean(0)
        return None
    p = layer["params"]
    kw = int(p.get("1", "0"))
    kh = int(p.get("11", kw))
    if mean.ndim != 3 or kh * kw == 0:
        return None
    pads = _pads(layer, mean.shape[1], mean.shape[2])
    if pads is None:
        return None
    dil, stride = int(p.get("2", "1")), int(p.get("3", "1"))
    dilations, strides = (int(p.get("12", dil)), dil), (int(p.get("13", stride)), stride)
    groups = layer["group"] if layer["type"] == "ConvolutionDepthWise" else 1
    cin = dw.size // (out * kh * kw)
    if cin * groups != mean.shape[0] or out % groups or cin * out * kh * kw != dw.size:
        return None
    dw = dw.reshape(out, cin, kh, kw)
    taps = tap_means(mean, (kh, kw), pads, strides, dilations)
    per = out // groups
    return np.concatenate(
        [np.einsum("ocij,cij->o", dw[g * per : (g + 1) * per], taps[g * cin : (g + 1) * cin]) for g in range(groups)]
    )


def corrected_biases(layers: list[dict[str, Any]], means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer name -> its float bias less the mean output error of ncnn's rounded weights, for every biased int8
    layer whose input's mean was measured and whose layout is handled."""
    out = {}
    for layer in layers:
        if not layer["bias"] or layer["bottom"] not in means:
            continue
        corr = mean_error(layer, means[layer["bottom"]])
        if corr is None or corr.shape != (layer["num_output"],):
            continue
        out[layer["name"]] = corr
    return out


def rewrite(
    param_text: str,
    weights: bytes,
    layers: list[dict[str, Any]],
    thresholds: dict[str, float],
    corrections: dict[str, np.ndarray] | None = None,
) -> tuple:
    """The int8 .param and .bin: ``8=`` on each int8 layer's line, its scales after its weights in the .bin (the
    input's 127 / threshold); the bias of each layer in ``corrections`` less that correction."""
    lines = param_text.splitlines()
    pieces, start = [], 0
    corrections = corrections or {}
    for layer in layers:
        t = float(thresholds.get(layer["bottom"], 0.0))
        if not t > 0:
            continue  # an input that was always 0 in calibration: leave the layer in float
        lines[layer["line"]] += f" 8={INT8_LAYERS[layer['type']]}"
        corr = corrections.get(layer["name"])
        if corr is not None:
            at, n = layer["bias_at"], layer["num_output"]
            bias = np.frombuffer(weights, np.float32, n, at).astype(np.float64)
            pieces += [weights[start:at], (bias - corr).astype(np.float32).tobytes()]
            start = at + 4 * n
        pieces += [weights[start : layer["end"]], weight_scales(layer).tobytes()]
        pieces.append(np.asarray([127.0 / t], np.float32).tobytes())
        start = layer["end"]
    pieces.append(weights[start:])
    return ("\n".join(lines) + "\n").encode(), b"".join(pieces)


def _items(ncnn: Any, net: Any, inputs: list[dict[str, Any]], samples: list[dict[str, np.ndarray]], blobs: list[str]):
    """Per item of every sample (ncnn has no batch axis): the fp32 values of ``blobs``, as ncnn computes them."""
    for feeds in samples:
        arrays = {d["name"]: np.asarray(feeds[d["name"]], np.float32) for d in inputs}
        n = next(iter(arrays.values())).shape[0] if arrays else 1
        for i in range(n):
            ex = net.create_extractor()
            for d in inputs:
                x = arrays[d["name"]]
                bi = int(d.get("batch_index", 0))
                item = x[i] if bi == 0 else (np.take(x[i : i + 1], 0, axis=bi) if bi != 233 else x)
                ex.input(d["blob"], ncnn.Mat(np.ascontiguousarray(item)).clone())
            got = {}
            for blob in blobs:
                rc, mat = ex.extract(blob)
                if rc != 0:
                    raise CompileError(f"ncnn:int8: ncnn could not compute blob {blob} for calibration (error {rc})")
                got[blob] = np.array(mat)
            yield got


def calibrate(
    ncnn: Any,
    net: Any,
    inputs: list[dict[str, Any]],
    samples: list[dict[str, np.ndarray]],
    blobs: list[str],
    ranges: str = RANGES[0],
    keep: frozenset[str] = frozenset(),
    means: bool = False,
) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Each blob's int8 threshold (``ranges``: mse, percentile or maxabs; max |x| for the blobs in ``keep``), its
    max |x|, and (with ``means``) its mean over the samples, all computed by ncnn on the fp32 model: one pass for
    the maxima and means, a second for the histograms of |x| between 0 and each maximum."""
    peaks = dict.fromkeys(blobs, 0.0)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for got in _items(ncnn, net, inputs, samples, blobs):
        count += 1
        for blob, x in got.items():
            peaks[blob] = max(peaks[blob], float(np.abs(x).max(initial=0.0)))
            if means:
                sums[blob] = sums.get(blob, 0) + x.astype(np.float64)
    thresholds = dict(peaks)
    tuned = [b for b in blobs if b not in keep and peaks[b] > 0] if ranges != "maxabs" else []
    if tuned:
        hists = {b: np.zeros(BINS) for b in tuned}
        for got in _items(ncnn, net, inputs, samples, tuned):
            for blob, x in got.items():
                hists[blob] += histogram(np.abs(x), 0.0, peaks[blob])
        for blob, hist in hists.items():
            edges = np.linspace(0.0, peaks[blob], BINS + 1)
            if ranges == "mse":
                thresholds[blob] = mse_range(hist, edges, 0.0, peaks[blob], _STEPS, True)[1]
            else:  # percentile: the upper edge of the bin where PERCENTILE of |x| is reached
                cdf = np.cumsum(hist) / hist.sum()
                thresholds[blob] = float(edges[1 + int(np.searchsorted(cdf, PERCENTILE / 100))])
    return thresholds, peaks, {b: v / max(count, 1) for b, v in sums.items()}
