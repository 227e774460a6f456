"""How the int8 gate judges a target by the package's task (luodi.quant.agreement): a classifier by its top-1 class,
a detector by its boxes after the pipeline's own decode and NMS — a head whose scores were lost finds no box and
fails, where the raw head's max-abs error (pixel coordinates beside 0..1 scores) cannot see it."""

from __future__ import annotations

import numpy as np
import pytest

import luodi.zoo
from luodi.quant.agreement import DetectionAgreement, matched_boxes, measure_for, top1

CLASSES = 3


def _head(boxes: list[tuple[float, float, float, float, int, float]], anchors: int = 8) -> np.ndarray:
    """A YOLOv8 head [1, 4 + classes, anchors]: one anchor per (cx, cy, w, h, class, score), the rest empty."""
    head = np.zeros((1, 4 + CLASSES, anchors), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        head[0, :4, i] = cx, cy, w, h
        head[0, 4 + cls, i] = score
    return head


def _measure() -> DetectionAgreement:
    spec = {"graph": [{"op": "yolo_decode", "in": "head", "out": ["b", "s", "i"], "conf": 0.25}, {"op": "nms"}]}
    m = measure_for(spec)
    assert isinstance(m, DetectionAgreement)
    return m


REF = [(50, 50, 20, 20, 0, 0.9), (150, 80, 40, 30, 1, 0.6)]


def test_the_same_boxes_agree_and_lost_scores_do_not() -> None:
    m = _measure()
    ref = np.concatenate([_head(REF), _head([(30, 30, 10, 10, 2, 0.8)])])
    assert m(ref, ref.copy()) == 1.0
    moved = ref.copy()
    moved[:, :2] += 1.0  # a pixel off on 10-40 pixel boxes: still the same boxes
    assert m(ref, moved) == 1.0
    lost = ref.copy()
    lost[:, 4:] = 0.0  # one int8 scale for pixels and scores: every score rounds to 0
    assert m(ref, lost) == 0.0
    # the raw head barely changed by a max-abs measure: its largest value is a coordinate
    assert np.abs(lost - ref).max() <= 0.01 * np.abs(ref).max()


def test_a_lost_box_and_a_spurious_box_both_count() -> None:
    m = _measure()
    ref = _head(REF)
    one_lost = _head(REF[:1])
    assert m(ref, one_lost) == pytest.approx(1 / 2)
    extra = _head([*REF, (250, 250, 30, 30, 2, 0.7)])
    assert m(ref, extra) == pytest.approx(2 / 3)
    wrong_class = _head([REF[0], (150, 80, 40, 30, 2, 0.6)])
    assert m(ref, wrong_class) == pytest.approx(1 / 2)
    shifted = _head([REF[0], (170, 80, 40, 30, 1, 0.6)])  # IoU 1/3 with its reference box
    assert m(ref, shifted) == pytest.approx(1 / 2)


def test_nothing_on_either_side_is_nothing_to_judge() -> None:
    m = _measure()
    empty = _head([])
    assert m(empty, empty) is None
    assert m(empty, _head(REF)) == 0.0  # boxes where the float model finds none


def test_matching_is_one_to_one() -> None:
    a = (np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32), np.array([0.9, 0.8]), np.array([0, 0]))
    b = (np.array([[0, 0, 10, 10]], np.float32), np.array([0.9]), np.array([0]))
    assert matched_boxes(a, b) == 1


def test_the_measure_follows_the_packages_task() -> None:
    assert measure_for(None) is top1
    assert measure_for(luodi.zoo.get("efficientnet-lite0").pipeline) is top1
    detector = measure_for(luodi.zoo.get("yolov8n-nudenet").pipeline)
    assert isinstance(detector, DetectionAgreement) and detector.decode.conf == 0.25 and detector.nms.iou == 0.45
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert top1(scores, scores[::-1].copy()) == 0.0 and top1(scores, scores) == 1.0
