"""YOLO detection ops: letterbox, decode the raw head, class-wise NMS, boxes mapped back to the image.

Semantics follow Ultralytics YOLOv8 (centred letterbox filled with 114, bilinear resize); boxes are x1,y1,x2,y2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ...errors import MissingExtraError, PipelineError
from ..registry import register_op


def cv2_module() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise MissingExtraError("this pipeline needs OpenCV; install it with: pip install 'luodi[pipelines]'") from exc
    return cv2


class Detection(NamedTuple):
    """One detected object: class index and name, confidence, box (x1, y1, x2, y2) in source pixels."""

    index: int
    label: str
    score: float
    box: tuple[float, float, float, float]


def as_rgb_array(img: Any) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise PipelineError(f"expected an RGB image (uint8 HxWx3), got {arr.dtype} {list(arr.shape)}; decode it first")
    return arr


@register_op
class Letterbox:
    """Image -> (tensor [1,3,S,S] float32 RGB in 0..1, geometry): scaled to fit S keeping aspect, centred on 114 grey.

    Resize is OpenCV INTER_LINEAR, as Ultralytics trains and exports YOLOv8. Geometry holds the scale,
    the padding and the source size for ``unletterbox``.
    """

    op = "letterbox"
    stage = "pre"

    def __init__(self, size: int = 640, fill: int = 114) -> None:
        self.size, self.fill = int(size), int(fill)

    def __call__(self, img: Any) -> tuple[np.ndarray, dict[str, float]]:
        cv2 = cv2_module()
        arr = as_rgb_array(img)
        h, w = arr.shape[:2]
        scale = min(self.size / h, self.size / w)
        nw, nh = round(w * scale), round(h * scale)
        if (nw, nh) != (w, h):
            arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        dw, dh = (self.size - nw) / 2, (self.size - nh) / 2
        top, left = round(dh - 0.1), round(dw - 0.1)
        out = np.full((self.size, self.size, 3), self.fill, np.uint8)
        out[top : top + nh, left : left + nw] = arr
        tensor = (out.transpose(2, 0, 1)[None].astype(np.float32)) * np.float32(1 / 255)
        return tensor, {"scale": scale, "left": left, "top": top, "width": w, "height": h}


@register_op
class YoloDecode:
    """YOLOv8 head [1, 4 + classes, anchors] -> (boxes x1y1x2y2 [n,4], scores [n], class ids [n]) above ``conf``."""

    op = "yolo_decode"
    stage = "post"
    options = ("conf",)

    def __init__(self, conf: float = 0.25) -> None:
        self.conf = float(conf)

    def __call__(self, head: np.ndarray, conf: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if head.ndim != 3 or head.shape[0] != 1 or head.shape[1] < 5:
            raise PipelineError(f"yolo_decode expects a [1, 4+classes, anchors] head, got {list(head.shape)}")
        rows = head[0].T
        cls = rows[:, 4:]
        ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(cls)), ids]
        keep = scores >= (self.conf if conf is None else float(conf))
        cx, cy, w, h = rows[keep, :4].T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        return boxes, scores[keep], ids[keep]


@register_op
class Nms:
    """Class-wise non-maximum suppression (OpenCV ``NMSBoxesBatched``): boxes of different classes never suppress."""

    op = "nms"
    stage = "post"
    options = ("iou",)

    def __init__(self, iou: float = 0.45, max_det: int = 300) -> None:
        self.iou, self.max_det = float(iou), int(max_det)

    def __call__(
        self, boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, iou: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, scores, ids
        cv2 = cv2_module()
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(), scores.tolist(), ids.tolist(), 0.0, self.iou if iou is None else float(iou)
        )
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self.max_det]
        return boxes[keep], scores[keep], ids[keep]


@register_op
class Unletterbox:
    """Boxes in letterboxed model pixels -> boxes in source image pixels, clipped to the image."""

    op = "unletterbox"
    stage = "post"

    def __call__(self, boxes: np.ndarray, geometry: dict[str, float]) -> np.ndarray:
        shift = np.array([geometry["left"], geometry["top"]] * 2, np.float32)
        out = (boxes - shift) / geometry["scale"]
        limit = np.array([geometry["width"], geometry["height"]] * 2, np.float32)
        return np.clip(out, 0, limit)


@register_op
class Detections:
    """Boxes, scores and class ids -> Detection tuples with class names, best first."""

    op = "detections"
    stage = "post"

    def __init__(self, labels: list[str] | None = None) -> None:
        self.labels = labels or []

    def __call__(self, boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> list[Detection]:
        order = np.argsort(-scores, kind="stable")
        return [
            Detection(
                int(ids[i]),
                self.labels[int(ids[i])] if int(ids[i]) < len(self.labels) else str(int(ids[i])),
                float(scores[i]),
                tuple(float(v) for v in boxes[i]),  # type: ignore[arg-type]
            )
            for i in order
        ]
