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
  (each int8 layer's bottom blob extracted): 127 / max |x| over the samples (ncnn2table's max-abs method).

The scales are symmetric int8 per tensor for activations and per channel for weights, as ncnn computes. Layers
with dynamic weights (``19=1``) stay in float.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import numpy as np

from ..errors import CompileError

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
        last = log[at + len(want) - 1]
        layer["end"] = last[0] + last[1]
        at += len(want)


def weight_scales(layer: dict[str, Any]) -> np.ndarray:
    """ncnn2int8's per output channel (per group for a depthwise) scale: 127 / max |w|, 1 for an all-zero row."""
    rows = layer["group"] if layer["type"] == "ConvolutionDepthWise" else layer["num_output"]
    peak = np.abs(layer["w"].reshape(rows, -1)).max(axis=1)
    return np.where(peak > 0, 127.0 / np.maximum(peak, 1e-30), 1.0).astype(np.float32)


def rewrite(param_text: str, weights: bytes, layers: list[dict[str, Any]], blob_peaks: dict[str, float]) -> tuple:
    """The int8 .param and .bin: ``8=`` on each int8 layer's line, its scales after its weights in the .bin."""
    lines = param_text.splitlines()
    pieces, start = [], 0
    for layer in layers:
        peak = float(blob_peaks.get(layer["bottom"], 0.0))
        if not peak > 0:
            continue  # an input that was always 0 in calibration: leave the layer in float
        lines[layer["line"]] += f" 8={INT8_LAYERS[layer['type']]}"
        pieces += [weights[start : layer["end"]], weight_scales(layer).tobytes()]
        pieces.append(np.asarray([127.0 / peak], np.float32).tobytes())
        start = layer["end"]
    pieces.append(weights[start:])
    return ("\n".join(lines) + "\n").encode(), b"".join(pieces)


def calibrate(
    ncnn: Any, net: Any, inputs: list[dict[str, Any]], samples: list[dict[str, np.ndarray]], blobs: list[str]
) -> dict[str, float]:
    """max |x| of each blob in ``blobs`` over ``samples``, computed by ncnn on the fp32 model."""
    peaks = dict.fromkeys(blobs, 0.0)
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
            for blob in blobs:
                rc, mat = ex.extract(blob)
                if rc != 0:
                    raise CompileError(f"ncnn:int8: ncnn could not compute blob {blob} for calibration (error {rc})")
                peaks[blob] = max(peaks[blob], float(np.abs(np.array(mat)).max(initial=0.0)))
    return peaks
