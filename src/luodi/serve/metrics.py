"""Prometheus metrics of the model server, per model and version, and its structured (JSON lines) logs.

Each server has its own CollectorRegistry, so several servers (or tests) in one process never share counters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ("model", "version")


class Metrics:
    """The repository's observer: counts requests and batches, and exposes the queue depth of each version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("luodi_requests", "Inference requests answered", _LABELS, registry=r)
        self.failures = Counter(
            "luodi_request_failures", "Inference requests that failed", (*_LABELS, "reason"), registry=r
        )
        self.queue = Histogram(
            "luodi_queue_seconds", "Time a request waited in the batcher", _LABELS, buckets=_LATENCY, registry=r
        )
        self.compute = Histogram(
            "luodi_compute_seconds", "Engine time of the batch a request ran in", _LABELS, buckets=_LATENCY, registry=r
        )
        self.total = Histogram(
            "luodi_request_seconds", "Time from request received to answer ready", _LABELS, buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram("luodi_batch_size", "Items per executed batch", _LABELS, buckets=_BATCH, registry=r)
        self.depth = Gauge("luodi_queue_depth", "Requests waiting in the batcher", _LABELS, registry=r)
        self.loaded = Gauge("luodi_model_loaded", "1 while a model version is loaded", _LABELS, registry=r)
        self.restarts = Gauge(
            "luodi_worker_restarts", "Restarts of an isolated version's engine process (crashes)", _LABELS, registry=r
        )

    def request(self, mv: Any, ok: bool, total_s: float, job: Any, reason: str) -> None:
        labels = (mv.name, mv.version)
        self.requests.labels(*labels).inc()
        if not ok:
            self.failures.labels(*labels, reason or "error").inc()
            return
        self.total.labels(*labels).observe(total_s)
        if job is not None:
            self.queue.labels(*labels).observe(job.queue_s)
            self.compute.labels(*labels).observe(job.compute_s)

    def batch(self, mv: Any, size: int) -> None:
        self.batch_size.labels(mv.name, mv.version).observe(size)

    def added(self, mv: Any) -> None:
        self.depth.labels(mv.name, mv.version).set_function(lambda: mv.batcher.depth)
        self.loaded.labels(mv.name, mv.version).set(1)
        worker = mv.session.worker  # isolated (luodi serve --isolate): its engine runs in a worker process
        if worker is not None:
            self.restarts.labels(mv.name, mv.version).set_function(lambda: worker.restarts)

    def removed(self, mv: Any) -> None:
        for gauge in (self.depth, self.loaded, self.restarts):
            with contextlib.suppress(KeyError):  # never added: its load failed
                gauge.remove(mv.name, mv.version)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's structured ``extra`` fields."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message",
        "asctime",
        "taskName",
        "color_message",
    }

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for luodi's server logs and uvicorn's own."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("luodi", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
