"""Image pre-processing ops: decode, resize, centre crop, normalise, to tensor (one item, no batch axis).

Each op is one small class with ``__call__``; they use Pillow and numpy only.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ..errors import PipelineError
from .registry import register_op

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


def _resample(name: str) -> int:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise PipelineError(f"unknown interpolation '{name}'; choose one of {sorted(_RESAMPLE)}") from None


@register_op
class DecodeImage:
    """Path, bytes, PIL image or HWC uint8 array -> PIL image in ``mode`` (RGB by default)."""

    op = "decode_image"

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, x: Any) -> Any:
        from ..extras import require

        require("PIL", "decoding an image")
        from PIL import Image, UnidentifiedImageError

        if isinstance(x, Image.Image):
            img = x
        elif isinstance(x, np.ndarray):
            if x.dtype != np.uint8 or x.ndim not in (2, 3):
                raise PipelineError(
                    f"an image array must be uint8 HxW or HxWxC, got {x.dtype} with shape {list(x.shape)}"
                )
            img = Image.fromarray(x)
        elif isinstance(x, (str, os.PathLike, bytes)):
            src = io.BytesIO(x) if isinstance(x, bytes) else x
            try:
                img = Image.open(src)
                img.load()
            except (OSError, UnidentifiedImageError) as exc:
                where = "the given bytes" if isinstance(x, bytes) else f"'{x}'"
                raise PipelineError(f"cannot read an image from {where}: {exc}") from exc
        else:
            raise PipelineError(
                f"cannot make an image of a {type(x).__name__}; give a path, bytes, a PIL image or a uint8 array"
            )
        return img.convert(self.mode) if img.mode != self.mode else img


@register_op
class Resize:
    """Resize so the short side is ``short_side`` (keeping aspect), or to exactly ``size`` [h, w]."""

    op = "resize"

    def __init__(
        self, short_side: int | None = None, size: list[int] | None = None, interpolation: str = "bilinear"
    ) -> None:
        if (short_side is None) == (size is None):
            raise PipelineError("resize needs exactly one of 'short_side' or 'size'")
        self.short_side, self.size, self.resample = short_side, size, _resample(interpolation)

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        if self.size is not None:
            new = (int(self.size[1]), int(self.size[0]))
        elif w <= h:
            new = (self.short_side, max(1, round(h * self.short_side / w)))
        else:
            new = (max(1, round(w * self.short_side / h)), self.short_side)
        return img.resize(new, self.resample) if new != (w, h) else img


@register_op
class CenterCrop:
    """Crop the central ``size`` [h, w] region."""

    op = "center_crop"

    def __init__(self, size: list[int]) -> None:
        self.h, self.w = int(size[0]), int(size[1])

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        if w < self.w or h < self.h:
            raise PipelineError(f"center_crop {self.h}x{self.w} is larger than the image ({h}x{w}); resize first")
        left, top = round((w - self.w) / 2), round((h - self.h) / 2)
        return img.crop((left, top, left + self.w, top + self.h))


@register_op
class Normalize:
    """(pixel - mean) / std per channel, in the pixel units of the image (0-255 for 8-bit)."""

    op = "normalize"

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)

    def __call__(self, x: Any) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        return (arr - self.mean) * self.inv_std


@register_op
class ToTensor:
    """HWC array -> CHW (``layout`` "CHW") or kept HWC, cast to ``dtype``."""

    op = "to_tensor"

    def __init__(self, layout: str = "CHW", dtype: str = "float32") -> None:
        if layout not in ("CHW", "HWC"):
            raise PipelineError(f"to_tensor layout must be CHW or HWC, not {layout}")
        self.layout, self.dtype = layout, np.dtype(dtype)

    def __call__(self, x: Any) -> np.ndarray:
        arr = np.asarray(x)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.layout == "CHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=self.dtype)
