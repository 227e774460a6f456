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
        self._by_version: dict[tuple[str, str], tuple[Any, ...]] = {}

    def _series(self, mv: Any) -> tuple[Any, Any, Any, Any, Any]:
        """The version's labelled counter and histograms (requests, total, queue, compute, batch size), looked up
        once: ``labels()`` costs a lock and a dict look-up each time, and these are touched on every request."""
        series = self._by_version.get((mv.name, mv.version))
        if series is None:
            labels = (mv.name, mv.version)
            series = tuple(m.labels(*labels) for m in (self.requests, self.total, self.queue, self.compute))
            series += (self.batch_size.labels(*labels),)
            self._by_version[labels] = series
        return series

    def request(self, mv: Any, ok: bool, total_s: float, job: Any, reason: str) -> None:
        requests, total, queue, compute, _ = self._series(mv)
        requests.inc()
        if not ok:
            self.failures.labels(mv.name, mv.version, reason or "error").inc()
            return
        total.observe(total_s)
        if job is not None:
            queue.observe(job.queue_s)
            compute.observe(job.compute_s)

    def batch(self, mv: Any, size: int) -> None:
        self._series(mv)[4].observe(size)

    def added(self, mv: Any) -> None:
        self.depth.labels(mv.name, mv.version).set_function(lambda: mv.batcher.depth)
        self.loaded.labels(mv.name, mv.version).set(1)
        worker = mv.session.worker  # isolated (luodi serve --isolate): its engine runs in a worker process
        if worker is not None:
            self.restarts.labels(mv.name, mv.version).set_function(lambda: worker.restarts)

    def removed(self, mv: Any) -> None:
        self._by_version.pop((mv.name, mv.version), None)  # its series stay in the registry, as they did
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

    # One line per request is on the request path: the encoder is made once and the timestamp's date and time
    # once a second (json.dumps(default=...) builds an encoder per call; strftime is as dear as the rest together).
    _encode = json.JSONEncoder(default=str).encode
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, stamp = self._second
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, stamp)
        doc: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self._encode(doc)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for luodi's server logs and uvicorn's own."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("luodi", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
