"""mnn:int8: MNN's own post-training quantisation, fed the compile's calibration samples.

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

The feature (activation) method is MNN's: ``KL`` (default; the KL-divergence threshold per tensor), ``ADMM`` or
``EMA``; weights ``MAX_ABS`` (default) or ``ADMM``. MNN's int8 is symmetric: per-tensor int8 activations
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

FEATURE_METHODS = ("KL", "ADMM", "EMA")
WEIGHT_METHODS = ("MAX_ABS", "ADMM")
CALIB_DIR = "calib"
CONFIG_FILE = "quant.json"


def check_methods(feature: str, weight: str) -> None:
    if feature not in FEATURE_METHODS:
        raise CompileError(f"mnn:int8 method {feature!r} is not one of MNN's: {', '.join(FEATURE_METHODS)}")
    if weight not in WEIGHT_METHODS:
        raise CompileError(f"mnn:int8 weight_method {weight!r} is not one of MNN's: {', '.join(WEIGHT_METHODS)}")


def write_calibration(
    workdir: Path,
    inputs: list[TensorSpec],
    samples: list[dict[str, Any]],
    pixels: bool,
    feature: str = "KL",
    weight: str = "MAX_ABS",
) -> dict[str, Any]:
    """Write ``samples`` (feed dicts through the model's pipeline) into ``workdir/calib`` as MNN's quantiser reads
    them, and return its JSON config (the caller writes it next to the model). ``pixels``: the model's input takes
    8-bit pixel values (its normalisation was folded in), so the images are the values themselves."""
    check_methods(feature, weight)
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
    shape = arrays[0].shape
    folder = workdir / CALIB_DIR
    folder.mkdir()
    config: dict[str, Any] = {
        "path": f"{folder}/",  # MNN joins the folder and each file name without a separator
        "used_sample_num": len(arrays),
        "feature_quantize_method": feature,
        "weight_quantize_method": weight,
        "batch_size": 1,
        "quant_bits": 8,
    }
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise CompileError(
            f"mnn:int8: MNN's quantiser calibrates an image input (N x 1 or 3 x H x W) here; input {spec.name} has "
            f"samples of shape {[1, *shape]}: choose another int8 target, e.g. onnxruntime:int8"
        )
    config.update(_write_images(folder, np.stack(arrays), pixels))
    return config


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


def unfold_input_normalization(model: Any, folded: dict[str, Any] | None) -> Any:
    """``model`` (a copy) with the pipeline normalisation that the compiler folded into the first Conv taken out
    again, as explicit ``(x - mean) / std`` nodes in front of it; ``model`` itself when nothing was folded.

    MNN quantises a convolution's input per tensor and symmetrically: pixels 0..255 get a step of 2 (seven bits),
    the normalised input (-1..1) the full eight. Measured on EfficientNet-Lite0 (KL, the 169 held-apart photos):
    top-1 agreement with fp32 82.8% folded, 85.8% with the normalisation outside the model. The inverse of
    luodi.compiler.passes.normalize: the Conv's weights times std, its bias plus sum(W_folded * mean), and the Pad
    the fold wrote with the mean pads with 0 again."""
    if not folded:
        return model
    from onnx import helper, numpy_helper

    name = folded.get("input")
    nodes = list(model.graph.node)
    readers = [i for i, n in enumerate(nodes) if name in n.input and n.op_type not in ("Shape", "Size")]
    if len(readers) != 1:
        return model
    consts = {t.name: t for t in model.graph.initializer}
    pad_at, conv_at = None, readers[0]
    if nodes[conv_at].op_type == "Pad":
        pad_at = conv_at
        after = [i for i, n in enumerate(nodes) if nodes[pad_at].output[0] in n.input]
        if len(after) != 1:
            return model
        conv_at = after[0]
    conv = nodes[conv_at]
    if conv.op_type != "Conv" or conv.input[1] not in consts or len(conv.input) < 3 or conv.input[2] not in consts:
        return model
    w = numpy_helper.to_array(consts[conv.input[1]]).astype(np.float64)
    b = numpy_helper.to_array(consts[conv.input[2]]).astype(np.float64)
    channels = w.shape[1]
    mean = np.broadcast_to(np.asarray(folded["mean"], np.float64), (channels,))
    std = np.broadcast_to(np.asarray(folded["std"], np.float64), (channels,))
    along = (1, -1, *[1] * (w.ndim - 2))
    out = type(model)()
    out.CopyFrom(model)
    graph = out.graph
    w_new = (w * std.reshape(along)).astype(np.float32)
    b_new = (b + (w * mean.reshape(along)).sum(axis=tuple(range(1, w.ndim)))).astype(np.float32)
    w_name, b_name, m_name, s_name = (f"luodi_unfolded_{k}" for k in ("w", "b", "mean", "inv_std"))
    normalised = "luodi_unfolded_input"
    graph.initializer.extend(
        [
            numpy_helper.from_array(w_new, w_name),
            numpy_helper.from_array(b_new, b_name),
            numpy_helper.from_array(mean.astype(np.float32).reshape(along), m_name),
            numpy_helper.from_array((1.0 / std).astype(np.float32).reshape(along), s_name),
        ]
    )
    graph.node[conv_at].input[1] = w_name
    graph.node[conv_at].input[2] = b_name
    first = graph.node[pad_at if pad_at is not None else conv_at]
    if pad_at is not None and len(first.input) > 2 and first.input[2]:
        zero = "luodi_unfolded_pad_value"
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        first.input[2] = zero
    for i, x in enumerate(first.input):
        if x == name:
            first.input[i] = normalised
    centred = "luodi_unfolded_centred"
    graph.node.insert(0, helper.make_node("Mul", [centred, s_name], [normalised], name="luodi_unfold_scale"))
    graph.node.insert(0, helper.make_node("Sub", [name, m_name], [centred], name="luodi_unfold_centre"))
    return out
