"""Classification post-processing: softmax and top-k with human-readable labels.

Ops take the batched model output and return one result per batch item.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import PipelineError
from .registry import register_op


def _count(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PipelineError(f"topk's k must be an int >= 1, got {k!r}")
    return int(k)


class Prediction(NamedTuple):
    index: int
    label: str
    score: float


@register_op
class Softmax:
    op = "softmax"

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = x.astype(np.float64) - x.max(axis=self.axis, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=self.axis, keepdims=True)).astype(np.float32)


@register_op
class TopK:
    """Per batch item, the ``k`` best classes as Predictions, best first."""

    op = "topk"
    options = ("k",)

    def __init__(self, k: int = 5, labels: list[str] | None = None) -> None:
        self.k, self.labels = _count(k), labels

    def __call__(self, scores: np.ndarray, k: int | None = None) -> list[list[Prediction]]:
        # A negative k would slice from the end: k=-3 gave every class but three, best first.
        k = min(self.k if k is None else _count(k), scores.shape[-1])
        rows = scores.reshape(scores.shape[0], -1)
        best = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        return [[Prediction(int(i), self._label(int(i)), float(row[i])) for i in idx] for row, idx in zip(rows, best)]

    def _label(self, i: int) -> str:
        return self.labels[i] if self.labels and i < len(self.labels) else str(i)
