"""Pictures of pipeline results for people: detection boxes and OCR quadrilaterals drawn on the source image.

Pillow only; it draws what a pipeline returned and never runs a model.
"""

from __future__ import annotations

from typing import Any

from .image import DecodeImage
from .ops import Detection, TextLine


def draw_results(image: Any, results: list[Any]) -> Any:
    """A copy of ``image`` (path, bytes, PIL image or array) with each Detection / TextLine outlined and labelled."""
    from PIL import ImageDraw

    img = DecodeImage("RGB")(image).copy()
    pen = ImageDraw.Draw(img)
    for r in results:
        if isinstance(r, Detection):
            pen.rectangle(r.box, outline=(255, 40, 40), width=3)
            pen.text((r.box[0] + 4, r.box[1] + 2), f"{r.label} {r.score:.2f}", fill=(255, 40, 40))
        elif isinstance(r, TextLine):
            pen.polygon([tuple(p) for p in r.box], outline=(40, 160, 255), width=2)
    return img
