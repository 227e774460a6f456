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

try:  # luodi[serve] installs it; the standard library writes what it refuses
    import orjson
except ImportError:  # pragma: no cover - luodi[serve] without it
    orjson = None

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


_STD_ENCODE = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's structured ``extra`` fields."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
        "message",
        "asctime",
        "taskName",
        "color_message",
    }

    # One line per request is on the request path: the line is written by orjson and the timestamp's date and
    # time made once a second (strftime is as dear as the rest together).
    _second: tuple[int, str] = (-1, "")

    @staticmethod
    def _encode(doc: dict[str, Any]) -> str:
        """``doc`` as one line of JSON; values that are not JSON as their str(). orjson writes it (the request
        line's encoding 6 -> 1 us), the standard library what orjson refuses (an integer beyond 64 bits)."""
        if orjson is not None:
            with contextlib.suppress(TypeError):  # orjson.JSONEncodeError is a TypeError
                return orjson.dumps(doc, default=str).decode()
        return _STD_ENCODE(doc)

    def format(self, record: logging.LogRecord) -> str:
        doc = self._head(record.created, record.levelname, record.name, record.getMessage())
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self._encode(doc)

    def _head(self, created: float, level: str, logger: str, msg: str) -> dict[str, Any]:
        second, stamp = self._second
        if int(created) != second:
            second = int(created)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, stamp)
        msecs = int((created - int(created)) * 1000)
        return {"ts": f"{stamp}.{msecs:03d}Z", "level": level.lower(), "logger": logger, "msg": msg}


class _JsonLines(logging.StreamHandler):
    """luodi's stderr handler. ``line()`` writes a request's line (what ``format`` of its record would write) without
    making the record: at one client of a tiny model, the logging call on the event loop cost ~0.1 ms of latency."""

    def line(self, level: int, logger: str, msg: str, fields: dict[str, Any]) -> None:
        formatter = self.formatter
        assert isinstance(formatter, JsonFormatter)
        doc = formatter._head(time.time(), logging.getLevelName(level), logger, msg)
        doc.update(fields)
        text = formatter._encode(doc)
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self.stream.write(text + self.terminator)
            self.flush()


def request_line(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """``logger.log(level, msg, extra=fields)``, written straight by luodi's own handler when that is all the
    logger's records would reach (no handler or filter of the caller's own): the same line, cheaper."""
    if logger.disabled or not logger.isEnabledFor(level):
        return
    handler = _only_handler(logger, level)
    if handler is None:
        logger.log(level, msg, extra=fields)
    else:
        handler.line(level, logger.name, msg, fields)


def _only_handler(logger: logging.Logger, level: int) -> _JsonLines | None:
    found: _JsonLines | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for h in current.handlers:
            if found is not None or not isinstance(h, _JsonLines) or h.filters or h.level > level:
                return None
            found = h
        if not current.propagate:
            break
        current = current.parent
    return found


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for luodi's server logs and uvicorn's own."""
    handler = _JsonLines()
    handler.setFormatter(JsonFormatter())
    for name in ("luodi", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
