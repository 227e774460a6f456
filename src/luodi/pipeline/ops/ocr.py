"""PP-OCR ops (text detection with DB, orientation classification, CTC recognition), as RapidOCR runs them.

Each op reproduces the step of rapidocr_onnxruntime 1.4 of the same name (OpenCV, pyclipper, shapely);
images are BGR uint8 arrays as PP-OCR was trained with. No op runs a model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ...errors import MissingExtraError, PipelineError
from ..registry import register_op
from .detection import cv2_module


class TextLine(NamedTuple):
    """One line of recognised text, its mean character confidence and its quadrilateral in source pixels."""

    text: str
    score: float
    box: list[list[float]]


@register_op
class ToBgr:
    """Decoded image (PIL or RGB/grey array) -> BGR uint8 array, as RapidOCR's LoadImage makes it."""

    op = "to_bgr"
    stage = "pre"

    def __call__(self, img: Any) -> np.ndarray:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise PipelineError(f"to_bgr expects a uint8 image, got {arr.dtype}; decode it with decode_image first")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise PipelineError(f"to_bgr expects HxW or HxWx3, got {list(arr.shape)}; decode with mode RGB first")
        return np.ascontiguousarray(arr[:, :, ::-1])


def _resize32(img: np.ndarray, ratio: float) -> np.ndarray:
    cv2 = cv2_module()
    h, w = img.shape[:2]
    rh, rw = round(int(h * ratio) / 32) * 32, round(int(w * ratio) / 32) * 32
    if rh <= 0 or rw <= 0:
        raise PipelineError(f"an image of {h}x{w} pixels is too small to read text from")
    return cv2.resize(img, (rw, rh))


@register_op
class FitSides:
    """Shrink an image whose long side passes ``max_side`` / grow one whose short side is under ``min_side``.

    -> (image, geometry) with the source size and the scale back to it (RapidOCR's preprocess).
    """

    op = "fit_sides"
    stage = "pre"

    def __init__(self, max_side: int = 2000, min_side: int = 30) -> None:
        self.max_side, self.min_side = int(max_side), int(min_side)

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        h0, w0 = img.shape[:2]
        ratio_h = ratio_w = 1.0
        if max(h0, w0) > self.max_side:
            h, w = img.shape[:2]
            img = _resize32(img, self.max_side / max(h, w))
            ratio_h, ratio_w = h / img.shape[0], w / img.shape[1]
        if min(img.shape[:2]) < self.min_side:
            h, w = img.shape[:2]
            img = _resize32(img, self.min_side / min(h, w))
            ratio_h, ratio_w = h / img.shape[0], w / img.shape[1]
        return img, {"height": h0, "width": w0, "ratio_h": ratio_h, "ratio_w": ratio_w, "top": 0}


@register_op
class PadFlat:
    """Pad a very flat (h <= ``min_height`` or w/h > ``max_ratio``) image top and bottom with black."""

    op = "pad_flat"
    stage = "pre"

    def __init__(self, min_height: int = 30, max_ratio: float = 8) -> None:
        self.min_height, self.max_ratio = int(min_height), float(max_ratio)

    def __call__(self, img: np.ndarray, geometry: dict[str, float]) -> tuple[np.ndarray, dict[str, float]]:
        h, w = img.shape[:2]
        if h > self.min_height and not (self.max_ratio > 0 and w / h > self.max_ratio):
            return img, geometry
        pad = int(abs(max(int(w / self.max_ratio), self.min_height) * 2 - h) / 2)
        cv2 = cv2_module()
        img = cv2.copyMakeBorder(img, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        return img, {**geometry, "top": pad}


@register_op
class DbResize:
    """BGR image -> DB detector input [1,3,H,W]: short side to ``limit_side`` (if shorter), sides to multiples of 32,
    (x/255 - 0.5)/0.5. Resize is OpenCV's default (bilinear), as PP-OCR's DetResizeForTest."""

    op = "db_resize"
    stage = "pre"

    def __init__(self, limit_side: int = 736) -> None:
        self.limit_side = int(limit_side)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        ratio = self.limit_side / min(h, w) if min(h, w) < self.limit_side else 1.0
        resized = _resize32(img, ratio)
        x = resized.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


@register_op
class DbPostprocess:
    """DB probability map -> text quadrilaterals in the pixels of ``img`` (the image given to db_resize).

    PP-OCR's DBPostProcess (threshold, 2x2 dilation, contours, min-area boxes, "fast" box score,
    pyclipper unclip) followed by RapidOCR's clockwise ordering, clipping and tiny-box filter.
    """

    op = "db_postprocess"
    stage = "post"

    def __init__(
        self,
        thresh: float = 0.3,
        box_thresh: float = 0.5,
        max_candidates: int = 1000,
        unclip_ratio: float = 1.6,
        use_dilation: bool = True,
    ) -> None:
        self.thresh, self.box_thresh, self.unclip_ratio = float(thresh), float(box_thresh), float(unclip_ratio)
        self.max_candidates, self.use_dilation, self.min_size = int(max_candidates), bool(use_dilation), 3

    def __call__(self, prob: np.ndarray, img: np.ndarray) -> np.ndarray:
        cv2 = cv2_module()
        dest_h, dest_w = img.shape[:2]
        pred = prob[0, 0]
        mask = (pred > self.thresh).astype(np.uint8)
        if self.use_dilation:
            mask = cv2.dilate(mask, np.ones((2, 2), np.uint8))
        height, width = mask.shape
        contours, _ = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        for contour in contours[: self.max_candidates]:
            points, sside = _mini_box(contour)
            if sside < self.min_size or self.box_thresh > _box_score(pred, points):
                continue
            box, sside = _mini_box(self._unclip(points))
            if sside < self.min_size + 2:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_w), 0, dest_w)
            box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_h), 0, dest_h)
            box = _clockwise(box.astype(np.int32).astype(np.float32))
            box[:, 0] = np.clip(box[:, 0], 0, dest_w - 1).astype(np.int32)
            box[:, 1] = np.clip(box[:, 1], 0, dest_h - 1).astype(np.int32)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue
            boxes.append(box)
        return np.array(boxes, np.float32).reshape(-1, 4, 2)

    def _unclip(self, box: np.ndarray) -> np.ndarray:
        try:
            import pyclipper
            from shapely.geometry import Polygon
        except ImportError as exc:
            raise MissingExtraError(
                "OCR post-processing needs pyclipper and shapely; install them with: pip install 'luodi[pipelines]'"
            ) from exc
        poly = Polygon(box)
        distance = poly.area * self.unclip_ratio / poly.length
        offset = pyclipper.PyclipperOffset()
        offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        return np.array(offset.Execute(distance)).reshape((-1, 1, 2))


def _mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    cv2 = cv2_module()
    rect = cv2.minAreaRect(contour)
    pts = sorted(list(cv2.boxPoints(rect)), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), min(rect[1])


def _box_score(pred: np.ndarray, box: np.ndarray) -> float:
    cv2 = cv2_module()
    h, w = pred.shape
    box = box.copy()
    xmin = np.clip(np.floor(box[:, 0].min()).astype(np.int32), 0, w - 1)
    xmax = np.clip(np.ceil(box[:, 0].max()).astype(np.int32), 0, w - 1)
    ymin = np.clip(np.floor(box[:, 1].min()).astype(np.int32), 0, h - 1)
    ymax = np.clip(np.ceil(box[:, 1].max()).astype(np.int32), 0, h - 1)
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    box[:, 0] -= xmin
    box[:, 1] -= ymin
    cv2.fillPoly(mask, box.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(pred[ymin : ymax + 1, xmin : xmax + 1], mask)[0]


def _clockwise(pts: np.ndarray) -> np.ndarray:
    xs = pts[np.argsort(pts[:, 0]), :]
    left, right = xs[:2], xs[2:]
    tl, bl = left[np.argsort(left[:, 1])]
    tr, br = right[np.argsort(right[:, 1])]
    return np.array([tl, tr, br, bl], dtype=np.float32)


@register_op
class ReadingOrder:
    """Quadrilaterals -> sorted top to bottom, then left to right within 10 px of one line (RapidOCR's order)."""

    op = "reading_order"
    stage = "post"

    def __call__(self, boxes: np.ndarray) -> np.ndarray:
        order = sorted(range(len(boxes)), key=lambda i: (boxes[i][0][1], boxes[i][0][0]))
        for i in range(len(order) - 1):
            for j in range(i, -1, -1):
                a, b = boxes[order[j]], boxes[order[j + 1]]
                if abs(b[0][1] - a[0][1]) < 10 and b[0][0] < a[0][0]:
                    order[j], order[j + 1] = order[j + 1], order[j]
                else:
                    break
        return boxes[order] if len(order) else boxes


@register_op
class CropQuads:
    """Image and quadrilaterals -> one upright crop per box (perspective warp, bicubic, replicated border);
    a crop 1.5x taller than wide is turned 90 degrees."""

    op = "crop_quads"
    stage = "pre"

    def __call__(self, img: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        cv2 = cv2_module()
        crops = []
        for pts in boxes.astype(np.float32):
            w = int(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3])))
            h = int(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2])))
            dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
            m = cv2.getPerspectiveTransform(pts, dst)
            crop = cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
            crops.append(np.rot90(crop) if crop.shape[0] / crop.shape[1] >= 1.5 else crop)
        return crops


def _resize_pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PP-OCR's resize_norm_img: keep aspect to ``height``, at most ``width``, (x/255-0.5)/0.5, zero-pad right."""
    cv2 = cv2_module()
    h, w = img.shape[:2]
    rw = min(width, int(math.ceil(height * w / float(h))))
    x = cv2.resize(img, (rw, height)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out


@register_op
class ClsBatch:
    """Crops -> the orientation classifier's input [n,3,48,192] (one batch: its width is fixed)."""

    op = "cls_batch"
    stage = "pre"

    def __init__(self, size: list[int] | None = None) -> None:
        self.h, self.w = (size or [48, 192])[:2]

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 3, self.h, self.w), np.float32)
        return np.stack([_resize_pad(c, self.h, self.w) for c in crops])


@register_op
class FixOrientation:
    """Crops and classifier scores [n, 2] ("0", "180") -> crops, those read upside down turned 180 degrees."""

    op = "fix_orientation"
    stage = "post"

    def __init__(self, thresh: float = 0.9) -> None:
        self.thresh = float(thresh)

    def __call__(self, crops: list[np.ndarray], scores: np.ndarray) -> list[np.ndarray]:
        flip = (scores.argmax(axis=1) == 1) & (scores.max(axis=1) > self.thresh)
        return [np.ascontiguousarray(c[::-1, ::-1]) if f else c for c, f in zip(crops, flip)]


@register_op
class RecBatches:
    """Crops -> (recogniser batches, crop order): crops sorted by aspect ratio, ``batch`` per batch, each batch
    padded to its widest ratio (at least 320/48), as RapidOCR batches them."""

    op = "rec_batches"
    stage = "pre"

    def __init__(self, size: list[int] | None = None, batch: int = 6) -> None:
        self.h, self.w = (size or [48, 320])[:2]
        self.batch = int(batch)

    def __call__(self, crops: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        order = np.argsort(np.array([c.shape[1] / float(c.shape[0]) for c in crops]))
        batches = []
        for start in range(0, len(crops), self.batch):
            chunk = [crops[i] for i in order[start : start + self.batch]]
            ratio = max([self.w / self.h] + [c.shape[1] * 1.0 / c.shape[0] for c in chunk])
            width = int(self.h * ratio)
            batches.append(np.stack([_resize_pad(c, self.h, width) for c in chunk]))
        return batches, order


@register_op
class CtcDecode:
    """Recogniser outputs (per batch [n, T, classes]) and crop order -> (text, mean confidence) per crop, in crop
    order: greedy CTC, repeats merged, blank (index 0) dropped; ``characters`` is the model's dictionary."""

    op = "ctc_decode"
    stage = "post"

    def __init__(self, characters: list[str]) -> None:
        # PP-OCR's dictionary: blank first, the characters, then a space last.
        self.table = np.array(["", *characters, " "], dtype=object)

    def __call__(self, outputs: list[np.ndarray], order: np.ndarray) -> list[tuple[str, float]]:
        results: list[tuple[str, float]] = [("", 0.0)] * len(order)
        done = 0
        for probs in outputs:
            idx, conf = probs.argmax(axis=2), probs.max(axis=2)
            keep = idx != 0
            keep[:, 1:] &= idx[:, 1:] != idx[:, :-1]
            for row in range(len(idx)):
                chars = idx[row][keep[row]]
                score = float(np.mean(conf[row][keep[row]].astype(np.float64))) if chars.size else 0.0
                results[order[done + row]] = ("".join(self.table[chars]), score)
            done += len(idx)
        return results


@register_op
class TextLines:
    """Quadrilaterals, (text, score) pairs and geometry -> TextLine results in source pixels, those scoring at least
    ``min_score`` kept (RapidOCR's text_score)."""

    op = "text_lines"
    stage = "post"
    options = ("min_score",)

    def __init__(self, min_score: float = 0.5) -> None:
        self.min_score = float(min_score)

    def __call__(
        self,
        boxes: np.ndarray,
        texts: list[tuple[str, float]],
        geometry: dict[str, float],
        min_score: float | None = None,
    ) -> list[TextLine]:
        pts = boxes.astype(np.float32).copy()
        pts[..., 1] -= geometry.get("top", 0)
        pts[..., 0] *= geometry.get("ratio_w", 1.0)
        pts[..., 1] *= geometry.get("ratio_h", 1.0)
        pts = np.clip(pts, 0, [geometry["width"], geometry["height"]])
        floor = self.min_score if min_score is None else float(min_score)
        return [TextLine(t, s, b.tolist()) for b, (t, s) in zip(pts, texts) if s >= floor]
