"""How a quantised model is judged against the float model on the validation samples: by the package's task.

The int8 gate and the fallback ask one question: on how many validation samples does the target give what the float
model gives? For a classifier that is its top-1 class. A detector's raw head is not a score vector (YOLOv8's is
[N, 4 + classes, anchors]) and top-1 says nothing about it; its answer is its boxes, so a detector is judged by
them: the package's own decode and non-maximum suppression (its pipeline's ``yolo_decode`` and ``nms`` steps, at its
confidence) on both outputs, each float box matched to at most one target box of the same class at IoU >= 0.5.
A lost box and a spurious one both count against it, so the figure is matched / sum over samples of
max(float boxes, target boxes). A measure returns None when there is nothing to judge (no class scores; no box on
either side on any sample).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Measure = Callable[[np.ndarray, np.ndarray], "float | None"]

MATCH_IOU = 0.5


def top1(reference: np.ndarray, got: np.ndarray) -> float | None:
    """Fraction of samples whose arg-max class is the same, for [N, classes] scores; None otherwise."""
    if reference.ndim != 2 or reference.shape[1] < 2:
        return None
    return float((reference.argmax(1) == got.argmax(1)).mean())


top1.description = "top-1 class"  # type: ignore[attr-defined]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (x1, y1, x2, y2)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def matched_boxes(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...], iou: float = MATCH_IOU) -> int:
    """How many reference boxes have a target box of the same class at IoU >= ``iou``, one-to-one, greedily in the
    order of the reference's scores (as NMS left them)."""
    ref_boxes, _, ref_ids = ref
    got_boxes, _, got_ids = got
    if not len(ref_boxes) or not len(got_boxes):
        return 0
    overlap = _iou(np.asarray(ref_boxes, np.float64), np.asarray(got_boxes, np.float64))
    overlap[np.asarray(ref_ids)[:, None] != np.asarray(got_ids)[None, :]] = 0.0
    used = np.zeros(len(got_boxes), bool)
    found = 0
    for row in overlap:
        row = np.where(used, 0.0, row)
        best = int(row.argmax())
        if row[best] >= iou:
            used[best] = True
            found += 1
    return found


class DetectionAgreement:
    """Boxes kept: the package's decode and NMS on both heads, matched by class at IoU >= 0.5 (module docstring)."""

    def __init__(self, decode: Any, nms: Any) -> None:
        self.decode, self.nms = decode, nms
        self.description = f"detections (class and IoU >= {MATCH_IOU} after the pipeline's decode and NMS)"

    def boxes(self, head: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.nms(*self.decode(np.asarray(head, np.float32)))

    def __call__(self, reference: np.ndarray, got: np.ndarray) -> float | None:
        total = found = 0
        for i in range(len(reference)):
            ref, out = self.boxes(reference[i : i + 1]), self.boxes(got[i : i + 1])
            total += max(len(ref[0]), len(out[0]))
            found += matched_boxes(ref, out)
        return None if total == 0 else found / total


def measure_for(pipeline: dict[str, Any] | None) -> Measure:
    """The package's task's measure: detections for a pipeline that decodes a YOLO head (``yolo_decode`` then
    ``nms``), top-1 otherwise."""
    steps = (pipeline or {}).get("graph") or []
    decode = next((s for s in steps if isinstance(s, dict) and s.get("op") == "yolo_decode"), None)
    if decode is None:
        return top1
    from ..pipeline.ops import detection  # noqa: F401 - registers the detection ops
    from ..pipeline.registry import build_op

    nms = next((s for s in steps if isinstance(s, dict) and s.get("op") == "nms"), {"op": "nms"})
    strip = ("in", "out")
    return DetectionAgreement(
        build_op({k: v for k, v in decode.items() if k not in strip}),
        build_op({k: v for k, v in nms.items() if k not in strip}),
    )


def describe(measure: Measure) -> str:
    return str(getattr(measure, "description", "top-1 class"))
