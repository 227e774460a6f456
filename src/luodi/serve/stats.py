"""The live figures of one model version, for the web page and /luodi/models (Prometheus has the histograms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Stats:
    """Live figures of one model version, for the web page (Prometheus has the full histograms)."""

    requests: int = 0
    failures: int = 0
    total_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    batches: int = 0
    batched_items: int = 0

    def as_dict(self) -> dict[str, Any]:
        ok = max(self.requests - self.failures, 1)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "mean_latency_ms": 1000 * self.total_s / ok,
            "mean_queue_ms": 1000 * self.queue_s / ok,
            "mean_compute_ms": 1000 * self.compute_s / ok,
            "mean_batch_size": self.batched_items / self.batches if self.batches else 0.0,
        }
