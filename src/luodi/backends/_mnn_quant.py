"""mnn:int8: MNN's int8, with luodi's activation ranges (the default) or MNN's own post-training quantisation.

Two routes, chosen by compile option ``ranges``:

- ``luodi`` (the default): luodi measures each quantised layer's input and output range on MNN's own float model and
  hands them to MNN's converter in a compression-params file (MNN_compression.proto as JSON, the format MNN's
  ``mnncompress`` PTQ/QAT tools write; ``_tools.mnnconvert`` with ``--compressionParamsFile``), which builds the
  int8 model (the converter's FullQuantAndCoding: int8 weights with the given per-channel scales, int8 tensors with
  the given scales). Per layer (each MNN ``Convolution``/``ConvolutionDepthwise`` with one input, Gemm included as
  MNN turns it into a 1x1 convolution): weight scales max-abs / 127 per output channel; every input and output
  tensor one symmetric scale, the MSE-optimal clipping of its value histogram over the calibration samples
  (luodi.backends._ptq.mse_range, 254 steps), measured by running the float .mnn with those tensors as outputs, so
  that the ranges are the tensors MNN quantises (after its fusions: a Conv + Relu's output is the Relu's). Two
  conversions: ONNX -> float .mnn, then .mnn -> int8 .mnn with the file, because MNN 3.6.1's converter applies the
  file before it loads the weights it keeps aside while converting (MatMul/Gemm weights of 64k values or more),
  and such a layer would be written without weights ("no quantized weight data" at run time). Before that, with
  ``bias_correction`` (true by default), each Conv's and Gemm's bias in the ONNX graph is less the mean output
  error of its weights as those scales round them (luodi.backends._onnx_ptq.correct_biases with
  ``rounded_symmetric``, the mean inputs measured with onnxruntime on the calibration samples). Compile option
  ``activations=asymmetric``: tensors take a zero point (255 steps over their range; MNN's int8 kernels take
  zero points), except a layer's output that reaches other ops than convolutions, poolings and element-wise ops
  (ZERO_POINT_OPS). EfficientNet-Lite0: 91.1% top-1 agreement with fp32 symmetric, 92.3% asymmetric;
  Fashion-MNIST CNN -0.02 and -0.01 points (docs/performance.md).
- ``mnn``: MNN's quantiser (below), with its ``method`` and ``weight_method``; setting either of those options
  chooses this route. Measured (docs/performance.md): on the Fashion-MNIST CNN its default KL clips the model's
  input at +-0.81 (the dark background's mode; the input spans -0.81..2.02), which alone costs 1.9 points of
  accuracy (KL's input scale with max-abs scales elsewhere: 87.70%; max-abs input with KL's other scales: 89.47%,
  fp32 89.56%).

MNN's quantiser is the ``mnnquant`` function of its ``_tools`` C extension (the library behind the ``mnnquant``
command), called in the conversion child (luodi.backends._mnn_child) as ``_tools.mnnquant(["mnnquant", SRC, DST,
CONFIG])``. luodi never runs the ``mnnquant`` command nor imports ``MNN.tools``: MNN.tools.mnnquant imports
``MNN.tools.utils.log``, which pip-installs aliyun-log-python-sdk when it is missing and sends a usage record
(model id, sizes, methods) after each run. The C function itself opens no socket (checked under ``strace -e
trace=socket,connect``: none for KL, ADMM and EMA). In MNN 3.6.1 the command's wrapper is broken besides (it passes
three strings where the C function takes one argument list, and dies of std::length_error).

The quantiser reads its calibration data from a folder, with a JSON config:

- an image-like input (one float NCHW input of 1 or 3 channels) as images: each sample becomes a binary PGM/PPM at
  the model's height and width, which MNN loads (stb_image), resizes to the same size (the identity) and maps with
  ``dst = (pixel - mean) * normal`` per channel. luodi chooses ``mean``/``normal`` so that pixels 0..255 span each
  channel's calibration range: exact for samples that are an affine map of 8-bit pixels reaching 0 and 255 in each
  channel (natural photos through any image pipeline), and within half a 1/255 step of the range otherwise, finer
  than the int8 input quantisation MNN applies after it. A model whose pipeline normalisation was folded into it
  takes the pixels themselves (mean 0, normal 1).

Only that: MNN 3.6.1's other feed, ``"input_type": "sequence"`` (a folder per sample with one text file per input),
reads every sample but its KL pass forwards the first sample's inputs for each of them (calibration.cpp of that
version), so KL would calibrate on one sample. A model with several inputs, or an input that is no 1- or 3-channel
image, is refused with a CompileError rather than calibrated wrongly.

The feature (activation) method is MNN's: ``KL`` (the default, MNN's too: the KL-divergence threshold per tensor),
``EMA`` (a moving average of each tensor's range; fed one batch of every sample here, so that it is their global
range) or ``ADMM``; weights ``MAX_ABS`` (default) or ``ADMM``. Measured (docs/performance.md): EMA in one batch is
the better on the two real models (EfficientNet-Lite0 88.2% top-1 agreement vs KL's 84.6%; Fashion-MNIST -0.40
points vs -1.92) but wrecks the random-weight test CNN (logits cosine 0.52 vs KL's 0.998), so KL stays the default
and EMA is the option to try (``target_options={"mnn": {"method": "EMA"}}``); ADMM crashes.
MNN's int8 is symmetric: per-tensor int8 activations
(-127..127, a scale and no zero point) on every tensor, and per-output-channel int8 weights on convolutions (and
on the Gemm MNN turns into one). MNN's ``skip_quant_op_names`` is not offered as a float fallback: a skipped
convolution keeps float weights but its tensors keep their int8 scales, and on the test CNN skipping its one
convolution changed no output value, so it cannot keep a layer in float the way the accuracy-budget fallback means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CompileError
from ..tensor import TensorSpec

RANGES = ("luodi", "mnn")
DEFAULT_RANGES = "luodi"
FEATURE_METHODS = ("KL", "EMA", "ADMM")
DEFAULT_METHOD = "KL"
EMA_BATCH_BYTES = 64 << 20
"""EMA's batch holds every sample up to this much input (EfficientNet-Lite0's 100 photos: 60 MB, one batch); a
larger set goes in batches of this size (MNN then drops the samples of a last, partial batch)."""
WEIGHT_METHODS = ("MAX_ABS", "ADMM")
CALIB_DIR = "calib"
CONFIG_FILE = "quant.json"
SAMPLES_FILE = "samples.npy"  # ranges "luodi": the calibration samples of the one input, stacked
COMPRESSION_FILE = "compression.json"  # ranges "luodi": MNN's compression-params file luodi writes
QUANTISED_OPS = ("Convolution", "ConvolutionDepthwise")
ZERO_POINT_OPS = ("Convolution", "ConvolutionDepthwise", "Pooling", "BinaryOp", "Eltwise")
"""With ``activations=asymmetric``, a layer's output takes a zero point only where it reaches these alone (through
poolings): on the Fashion-MNIST CNN the second Conv's output, which reaches the Gemm through MaxPool, Flatten and
Reshape, lost 11 dB of logits SNR with a zero point (33 -> 22 dB) whatever the other tensors' settings, although
every other tensor took one without loss (measured one at a time; MNN 3.6.1, x86 AVX-512)."""
LEVELS = 254  # symmetric int8 as MNN clamps it: -127..127


def check_methods(feature: str, weight: str) -> None:
    if feature not in FEATURE_METHODS:
        raise CompileError(f"mnn:int8 method {feature!r} is not one of MNN's: {', '.join(FEATURE_METHODS)}")
    if weight not in WEIGHT_METHODS:
        raise CompileError(f"mnn:int8 weight_method {weight!r} is not one of MNN's: {', '.join(WEIGHT_METHODS)}")


def stacked_samples(inputs: list[TensorSpec], samples: list[dict[str, Any]]) -> np.ndarray:
    """The calibration samples of the model's one float input, stacked (N x the sample shape); a CompileError for
    what neither route can calibrate (several inputs, an integer input, no samples, samples of several shapes)."""
    if len(inputs) != 1:
        raise CompileError(
            f"mnn:int8: MNN's quantiser calibrates models with one input; this model has {len(inputs)} "
            f"({', '.join(s.name for s in inputs)}): choose another int8 target, e.g. onnxruntime:int8"
        )
    spec = inputs[0]
    if spec.np_dtype.kind != "f":
        raise CompileError(f"mnn:int8 calibrates float inputs only; input {spec.name} is {spec.dtype}")
    arrays = _split(spec.name, samples)
    if not arrays:
        raise CompileError("mnn:int8 needs calibration data: pass calibration= (CLI: --calibration)")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CompileError(
            f"mnn:int8: calibration samples for input {spec.name} come in several shapes ({sorted(shapes)}); MNN's "
            "quantiser takes one"
        )
    return np.stack(arrays)


def write_samples(
    workdir: Path, inputs: list[TensorSpec], samples: list[dict[str, Any]], symmetric: bool = True
) -> dict[str, Any]:
    """Ranges "luodi": the samples into ``workdir/samples.npy`` for the conversion child, which measures the ranges
    on MNN's float model (measure_scales); the config the child reads."""
    np.save(workdir / SAMPLES_FILE, stacked_samples(inputs, samples))
    return {"ranges": "luodi", "input": inputs[0].name, "symmetric": symmetric}


def write_calibration(
    workdir: Path,
    inputs: list[TensorSpec],
    samples: list[dict[str, Any]],
    pixels: bool,
    feature: str = DEFAULT_METHOD,
    weight: str = "MAX_ABS",
) -> dict[str, Any]:
    """Ranges "mnn": write ``samples`` (feed dicts through the model's pipeline) into ``workdir/calib`` as MNN's
    quantiser reads them, and return its JSON config (the caller writes it next to the model). ``pixels``: the
    model's input takes 8-bit pixel values (its normalisation was folded in), so the images are the values
    themselves."""
    check_methods(feature, weight)
    data = stacked_samples(inputs, samples)
    spec, shape = inputs[0], data.shape[1:]
    folder = workdir / CALIB_DIR
    config: dict[str, Any] = {
        "path": f"{folder}/",  # MNN joins the folder and each file name without a separator
        "used_sample_num": len(data),
        "feature_quantize_method": feature,
        "weight_quantize_method": weight,
        # EMA keeps a moving average of each tensor's per-batch range: one batch of every sample makes it the
        # samples' global range (batches of 1 averaged it narrower than the data), within a memory bound
        "batch_size": max(1, min(len(data), EMA_BATCH_BYTES // max(data[0].nbytes, 1))) if feature == "EMA" else 1,
        "quant_bits": 8,
    }
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise CompileError(
            f"mnn:int8: MNN's quantiser calibrates an image input (N x 1 or 3 x H x W) here; input {spec.name} has "
            f"samples of shape {[1, *shape]}: choose another int8 target, e.g. onnxruntime:int8"
        )
    folder.mkdir()
    config.update(_write_images(folder, data, pixels))
    return config


def conv_layers(net: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers MNN's converter quantises from a compression-params file, from the float model as MNN's JSON dump
    (``mnnconvert -f MNN --JsonFile``) gives it: each Convolution/ConvolutionDepthwise of the main graph with one
    input and float weights, as ``{"op", "input", "output", "weight_scales", "plain"}`` (weight scales per output
    channel, max-abs / 127, 1 for an all-zero channel; ``plain``: the output reaches only convolutions, poolings and
    element-wise ops, through poolings, so that it may take a zero point, see ``ZERO_POINT_OPS``)."""
    names = net.get("tensorName") or []
    ops = net.get("oplists") or []
    consumers: dict[int, list[dict[str, Any]]] = {}
    for op in ops:
        for i in op.get("inputIndexes") or []:
            consumers.setdefault(i, []).append(op)

    def plain(index: int, depth: int = 0) -> bool:
        users = consumers.get(index, [])
        return depth < 8 and all(
            u.get("type") in ZERO_POINT_OPS
            and (u.get("type") != "Pooling" or all(plain(o, depth + 1) for o in u.get("outputIndexes") or []))
            for u in users
        )

    layers = []
    for op in ops:
        if op.get("type") not in QUANTISED_OPS:
            continue
        ins, outs = op.get("inputIndexes") or [], op.get("outputIndexes") or []
        conv = op.get("main") or {}
        weight, count = conv.get("weight") or [], (conv.get("common") or {}).get("outputCount") or 0
        if len(ins) != 1 or len(outs) != 1 or not weight or not count or len(weight) % count:
            continue
        peak = np.abs(np.asarray(weight, np.float32)).reshape(count, -1).max(1)
        scales = np.where(peak > 0, peak / 127.0, 1.0)
        layers.append(
            {
                "op": op["name"],
                "input": names[ins[0]],
                "output": names[outs[0]],
                "weight_scales": scales.tolist(),
                "plain": bool(consumers.get(outs[0])) and plain(outs[0]),
            }
        )
    return layers


def quantised_layers(net: dict[str, Any]) -> int:
    """How many convolutions of a model (MNN's JSON dump) hold int8 weights with an input scale, as MNN's converter
    writes them from a compression-params file."""
    return sum(
        1
        for op in net.get("oplists") or []
        if op.get("type") in QUANTISED_OPS and ((op.get("main") or {}).get("quanParameter") or {}).get("scaleIn")
    )


def asymmetric_tensors(layers: list[dict[str, Any]]) -> set[str]:
    """With asymmetric activations, the tensors that take a zero point: every layer's input, and its output where
    that is ``plain``; a tensor that is also another layer's output that is not plain stays symmetric."""
    held = {layer["output"] for layer in layers if not layer["plain"]}
    return {t for layer in layers for t in (layer["input"], layer["output"]) if t not in held}


def measure_scales(
    run: Any, samples: np.ndarray, tensors: list[str], asymmetric: set[str] = frozenset()
) -> dict[str, tuple[float, int]]:
    """Each tensor's int8 ``(scale, zero point)``: the MSE-optimal clipping of its values over ``samples`` (each run
    alone as a batch of one; ``run(x)`` gives the tensors' values in ``tensors``' order). Symmetric: -127..127
    about zero (zero point 0); those in ``asymmetric``: 255 steps from the low end to the high end with zero exact
    (-128..127, zero point where 0.0 falls). Two passes: the extremes, then the histograms between them."""
    from ._ptq import BINS, histogram, mse_range

    lows, highs = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    for x in samples:
        for t, v in zip(tensors, run(x[None])):
            if v.size:
                lows[t], highs[t] = min(lows[t], float(v.min())), max(highs[t], float(v.max()))
    for t in tensors:
        if t not in asymmetric:
            lows[t], highs[t] = -max(-lows[t], highs[t]), max(-lows[t], highs[t])
    hists = {t: np.zeros(BINS) for t in tensors if highs[t] > lows[t]}
    for x in samples:
        for t, v in zip(tensors, run(x[None])):
            if t in hists:
                hists[t] += histogram(v, lows[t], highs[t])
    out = {}
    for t in tensors:
        if t not in hists:
            out[t] = (1.0, 0)  # a tensor that is zero on every sample: any scale holds it exactly
            continue
        edges = np.linspace(lows[t], highs[t], BINS + 1)
        symmetric = t not in asymmetric
        lo, hi = mse_range(hists[t], edges, lows[t], highs[t], LEVELS if symmetric else 255, symmetric)
        if symmetric:
            out[t] = (hi / 127.0, 0)
        else:
            scale = (hi - lo) / 255.0
            out[t] = (scale, int(np.clip(np.round(-lo / scale) - 128, -128, 127)))
    return out


def compression_params(
    layers: list[dict[str, Any]],
    scales: dict[str, tuple[float, int]],
    version: str,
    asymmetric: set[str] = frozenset(),
) -> dict[str, Any]:
    """MNN's compression-params file (MNN_compression.proto's Pipeline, as JSON) that makes its converter quantise
    ``layers`` with these weight scales and tensor ``(scale, zero point)``s; weights symmetric, -127..127 like MNN's
    own, activations so too but those in ``asymmetric``, -128..127 with their zero points."""

    def tensor(name: str) -> dict[str, Any]:
        scale, zero = scales[name]
        low = -128 if name in asymmetric else -127
        return {"name": name, "bits": 8, "scales": [scale], "zeroPoint": zero, "clampMin": low, "clampMax": 127}

    return {
        "version": version,
        "algo": [
            {
                "type": "QUANTIZE",
                "quantParams": {
                    "layer": [
                        {
                            "opName": layer["op"],
                            "input": [tensor(layer["input"])],
                            "weight": [
                                {
                                    "name": layer["op"],
                                    "bits": 8,
                                    "scales": layer["weight_scales"],
                                    "clampMin": -127,
                                    "clampMax": 127,
                                }
                            ],
                            "output": [tensor(layer["output"])],
                        }
                        for layer in layers
                    ]
                },
            }
        ],
    }


def _split(name: str, samples: list[dict[str, Any]]) -> list[np.ndarray]:
    """Each sample of input ``name`` without its batch axis (a batch given at once is that many samples)."""
    out: list[np.ndarray] = []
    for feeds in samples:
        a = np.asarray(feeds[name], np.float32)
        if a.ndim < 2:
            raise CompileError(f"mnn:int8: calibration sample for input {name} has shape {list(a.shape)}")
        out.extend(a[i] for i in range(a.shape[0]))
    return out


def _write_images(folder: Path, data: np.ndarray, pixels: bool) -> dict[str, Any]:
    """Samples (N x C x H x W, C 1 or 3) as binary PGM/PPM files whose pixels span each channel's range; the
    config's format, mean, normal, width and height that map the pixels back onto the samples."""
    n, c, h, w = data.shape
    if pixels and data.min() >= 0 and data.max() <= 255:
        lo, step = np.zeros(c, np.float64), np.ones(c, np.float64)
    else:
        lo = data.min(axis=(0, 2, 3)).astype(np.float64)
        hi = data.max(axis=(0, 2, 3)).astype(np.float64)
        step = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    scaled = (data - lo[None, :, None, None]) / step[None, :, None, None]
    pix = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    magic, fmt = (b"P5", "GRAY") if c == 1 else (b"P6", "RGB")
    for i in range(n):
        body = pix[i].transpose(1, 2, 0).tobytes()  # H x W x C, interleaved
        (folder / f"{i:05d}.{'pgm' if c == 1 else 'ppm'}").write_bytes(magic + f"\n{w} {h}\n255\n".encode() + body)
    # MNN: dst = (pixel - mean) * normal; pixel p stands for lo + p * step, so normal = step, mean = -lo / step
    mean = [float(-lo[k] / step[k]) for k in range(c)]
    normal = [float(step[k]) for k in range(c)]
    return {"format": fmt, "mean": mean, "normal": normal, "width": int(w), "height": int(h)}
