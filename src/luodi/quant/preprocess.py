"""``--preprocess``: how images become tensors for a model that has no pipeline, written the way a deployment
engineer states it ("resize=224,224;layout=nchw;scale=1/255;mean=0.485,0.456,0.406;std=0.229,0.224,0.225").

It parses that text into the pre-processing steps of a pipeline spec, which the calibration and validation readers
(data.py) run on every image: x = (pixel * scale - mean) / std. It must not run a model or read any image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from ..errors import InputError
from ..tensor import TensorSpec

KEYS = {
    "resize": "H,W to resize to exactly, or S to resize the short side to S (default: the input's fixed H,W)",
    "crop": "H,W of a centre crop after the resize",
    "color": "rgb, bgr or gray (default: rgb for 3 channels, gray for 1)",
    "layout": "nchw or nhwc (default: where the input's channel axis of 1 or 3 is)",
    "scale": "pixel multiplier applied first, e.g. 1/255 (default 1)",
    "mean": "per-channel mean subtracted after scaling, in the colour order above (default 0)",
    "std": "per-channel divisor after the mean (default 1)",
    "interpolation": "bilinear, bicubic, nearest, ... (default bilinear)",
}
SYNTAX = "KEY=VALUE pairs separated by ';', e.g. resize=224,224;layout=nchw;scale=1/255;mean=0.485,0.456,0.406"


def _numbers(key: str, text: str) -> list[float]:
    try:
        return [float(Fraction(part.strip())) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--preprocess {key}={text}: expected numbers such as 1/255 or 0.485,0.456,0.406") from None


def _sizes(key: str, text: str, counts: tuple[int, ...]) -> list[int]:
    values = _numbers(key, text)
    if len(values) not in counts or any(v < 1 or v != int(v) for v in values):
        want = " or ".join({1: "S", 2: "H,W"}[c] for c in counts)
        raise InputError(f"--preprocess {key}={text}: expected {want} in whole pixels")
    return [int(v) for v in values]


def parse(text: str) -> dict[str, str]:
    """``"k=v;k=v"`` -> {k: v}; an InputError naming an unknown key or a pair without '='."""
    pairs: dict[str, str] = {}
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise InputError(f"--preprocess '{item}' is not KEY=VALUE; write {SYNTAX}")
        if key not in KEYS:
            raise InputError(f"--preprocess has no key '{key}'; the keys are: {', '.join(KEYS)}")
        pairs[key] = value.strip()
    return pairs


def _layout(spec: TensorSpec, given: str | None) -> str:
    if given is not None:
        if given.lower() not in ("nchw", "nhwc"):
            raise InputError(f"--preprocess layout={given}: choose nchw or nhwc")
        return given.lower()
    shape = spec.shape
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "nhwc"
    return "nchw"


def pipeline_spec(preprocess: str | dict[str, Any], inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The pipeline spec (pre-processing only) that ``preprocess`` describes for the model's first input.

    ``preprocess`` is the ``--preprocess`` text or a mapping of the same keys (values as text or numbers)."""
    if not inputs:
        raise InputError("--preprocess needs a model with an input")
    if isinstance(preprocess, str):
        pairs = parse(preprocess)
    else:
        pairs = parse(
            ";".join(
                f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in preprocess.items()
            )
        )
    spec = inputs[0]
    if len(spec.shape) != 4:
        raise InputError(
            f"--preprocess makes image tensors [N,C,H,W] or [N,H,W,C]; input '{spec.name}' is {spec.shape_str()}"
        )
    layout = _layout(spec, pairs.get("layout"))
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "nchw" else (1, 2, 3)
    channels = spec.shape[c_axis]
    color = pairs.get("color", "gray" if channels == 1 else "rgb").lower()
    if color not in ("rgb", "bgr", "gray"):
        raise InputError(f"--preprocess color={color}: choose rgb, bgr or gray")
    want_c = 1 if color == "gray" else 3
    if isinstance(channels, int) and channels != want_c:
        raise InputError(
            f"--preprocess color={color} gives {want_c} channel(s); input '{spec.name}' {spec.shape_str()} has "
            f"{channels} on its {layout} channel axis"
        )
    steps: list[dict[str, Any]] = [{"op": "decode_image", "mode": "L" if color == "gray" else "RGB"}]
    interpolation = pairs.get("interpolation", "bilinear")
    if "resize" in pairs:
        size = _sizes("resize", pairs["resize"], (1, 2))
        steps.append({"op": "resize", "interpolation": interpolation, **_resize_arg(size)})
    else:
        fixed = [spec.shape[h_axis], spec.shape[w_axis]]
        if not all(isinstance(d, int) for d in fixed) and "crop" not in pairs:
            raise InputError(
                f"input '{spec.name}' {spec.shape_str()} has a free height or width: give --preprocess "
                "resize=H,W (the size calibration images are brought to)"
            )
        if "crop" not in pairs:
            steps.append({"op": "resize", "size": fixed, "interpolation": interpolation})
    if "crop" in pairs:
        steps.append({"op": "center_crop", "size": _sizes("crop", pairs["crop"], (2,))})
    if color == "bgr":
        from ..pipeline import ops  # noqa: F401  (registers to_bgr, which the classic pipeline does not import)

        steps.append({"op": "to_bgr"})
    scale = _numbers("scale", pairs.get("scale", "1"))
    if len(scale) != 1 or scale[0] == 0:
        raise InputError(f"--preprocess scale={pairs.get('scale')}: expected one non-zero number such as 1/255")
    mean = _per_channel("mean", pairs.get("mean", "0"), want_c)
    std = _per_channel("std", pairs.get("std", "1"), want_c)
    if any(s == 0 for s in std):
        raise InputError(f"--preprocess std={pairs['std']}: a standard deviation cannot be 0")
    # (pixel * scale - mean) / std == (pixel - mean / scale) / (std / scale): normalize works in pixel units
    steps.append({"op": "normalize", "mean": [m / scale[0] for m in mean], "std": [s / scale[0] for s in std]})
    steps.append({"op": "to_tensor", "layout": "CHW" if layout == "nchw" else "HWC", "dtype": spec.dtype})
    return {"input": spec.name, "pre": steps}


def _resize_arg(size: list[int]) -> dict[str, Any]:
    return {"short_side": size[0]} if len(size) == 1 else {"size": size}


def _per_channel(key: str, text: str, channels: int) -> list[float]:
    values = _numbers(key, text)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise InputError(f"--preprocess {key}={text}: give 1 or {channels} values, one per channel")
    return values
