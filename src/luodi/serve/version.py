"""One loaded model version: its Session, the batcher over it, the check each request gets (once), its figures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UnknownTensorError
from .batcher import BatchConfig, Batcher, Feeds, Job
from .stats import Stats

LOADING, READY, UNAVAILABLE, DRAINING = "LOADING", "READY", "UNAVAILABLE", "DRAINING"


@dataclass
class Files:
    """What is on disk for one version: the package path and its stat, to notice a replaced file."""

    path: Path
    stamp: tuple[int, int]
    name: str = ""
    """The path relative to the repository: what clients are shown (never the server's directories)."""


class ModelVersion:
    """One version of one model, loaded: a Session, a Batcher over it, and its live figures."""

    def __init__(self, name: str, version: str, files: Files, config: BatchConfig, options: dict[str, Any]) -> None:
        from ..session import Session

        self.name, self.version, self.files, self.config = name, version, files, config
        self.stats = Stats()
        self.state = LOADING
        self._inflight = 0
        self._idle = threading.Condition()
        self._lock = threading.Lock()
        self.observer: Any = None  # metrics hooks, set by the repository
        if config.isolate is not None:  # the model's config.json overrides the server's --isolate
            options = {**options, "isolate": config.isolate}
        self.session = Session(files.path, **options)
        self.batchable = _batchable(self.session)
        self.session.prepare()  # allocate and warm up at the package's primary representative shapes
        self.batcher = Batcher(
            self.session.run_validated,  # each request was checked once, by submit()
            config,
            batchable=self.batchable,
            name=f"{name}-{version}",
            on_batch=self._on_batch,
        )

    @property
    def platform(self) -> str:
        return f"luodi_{self.session.backend}"

    def check(self, feeds: Feeds) -> None:
        """Raise an InputError naming the input when ``feeds`` does not fit the model (before it joins a batch)."""
        check_feeds(self.session, self.name, feeds)

    def submit(self, feeds: Feeds, timeout_s: float | None = None, *, inline: bool = False) -> Job:
        """Check ``feeds`` (the only check they get) and queue them; the job's future gives the outputs.

        ``inline``: run them in the calling thread instead when the batcher would run them alone at once anyway
        and the model is quick (Batcher.run_inline); the job then comes back done. Never for an engine in a worker
        process: a call there may wait for a crashed worker's restart, which must not hold the caller's loop."""
        self.check(feeds)
        feeds = {n: np.ascontiguousarray(a) for n, a in feeds.items()}  # what engines read; a no-op when it is
        inline = inline and self.session.worker is None
        return (inline and self.batcher.run_inline(feeds, timeout_s)) or self.batcher.submit(feeds, timeout_s)

    def predict(self, raw: Any, timeout_s: float | None = None, **options: Any) -> tuple[Any, Job | None]:
        """Run the package's pipeline on ``raw`` (e.g. image bytes), the model calls going through the batcher.

        Returns the result and the last model call's Job (its timings). Blocks: call it from a worker thread.
        """
        from ..errors import PipelineError

        pipe = self.session.pipeline
        if pipe is None:
            raise PipelineError(
                f"model '{self.name}' has no pre/post-processing pipeline; use /infer with tensors, "
                "or serve a package compiled with one (e.g. zoo:efficientnet-lite0)"
            )
        batched = _Batched(self, timeout_s)
        return pipe.run(raw, batched, **options), batched.job

    def observe(self, ok: bool, total_s: float, job: Job | None, reason: str = "") -> None:
        """Account one answered request (the server calls this once per request)."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            st = self.stats
            st.requests += 1
            st.last_ms = now_ms
            if ok:
                st.total_s += total_s
                st.rows += job.size if job is not None else 1
                if job is not None:
                    st.timed += 1
                    st.queue_s += job.queue_s
                    st.input_s += job.input_s
                    st.compute_s += job.compute_s
                    st.output_s += job.output_s
            else:
                st.failures += 1
                st.fail_s += total_s
        if self.observer is not None:
            self.observer.request(self, ok, total_s, job, reason)

    def _on_batch(self, size: int, compute_s: float, input_s: float, output_s: float) -> None:
        with self._lock:
            self.stats.batch(size, compute_s, input_s, output_s)
        if self.observer is not None:
            self.observer.batch(self, size)

    def triton_stats(self) -> dict:
        """This version's $model_stat of Triton's statistics extension."""
        with self._lock:
            return self.stats.as_triton(self.name, self.version)

    # -- in-flight accounting, so an old version closes only once its requests are answered --------
    @contextmanager
    def use(self) -> Iterator[ModelVersion]:
        with self._idle:
            self._inflight += 1
        try:
            yield self
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def close(self, timeout_s: float = 60.0) -> None:
        """Wait for in-flight requests (bounded), drain the queue, free the engine."""
        self.state = DRAINING
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.batcher.close(drain=True, timeout_s=max(deadline - time.monotonic(), 1.0))
        self.session.close()
        self.state = UNAVAILABLE

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "package": self.files.name,  # relative to the repository: clients never see server paths
            "backend": f"{self.session.backend}:{self.session.precision}",
            "batching": self.batchable,
            "max_batch_size": self.config.max_batch_size if self.batchable else 1,
            "queue_depth": self.batcher.depth,
            "pipeline": bool(self.session.package and self.session.package.pipeline),
            "worker": self.session.worker.describe() if self.session.worker else None,  # isolated: pid, restarts
            **self.stats.as_dict(),
        }


class _Batched:
    """What a pipeline calls as its session: model runs go through the version's batcher."""

    def __init__(self, version: ModelVersion, timeout_s: float | None) -> None:
        self._v, self._timeout = version, timeout_s or version.config.timeout_s
        self.job: Job | None = None

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self._v.session.inputs}
        arrays = {n: np.asarray(a, dtype=specs[n].np_dtype) if n in specs else np.asarray(a) for n, a in feeds.items()}
        self.job = self._v.submit(arrays, self._timeout)
        return self.job.future.result(self._timeout)

    def model(self, name: str) -> Any:
        return self if name == "main" else self._v.session.model(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._v.session, name)


def check_feeds(session: Any, name: str, feeds: Feeds) -> None:
    """Raise an InputError naming the input when ``feeds`` does not fit model ``name``'s session."""
    specs = {s.name: s for s in session.inputs}
    unknown = [n for n in feeds if n not in specs]
    if unknown:
        raise UnknownTensorError(f"model '{name}' has no input(s) {unknown}; its inputs are {list(specs)}")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise InputError(f"model '{name}' needs input(s) {missing} too")
    for n, a in feeds.items():
        specs[n].check(a)


def _batchable(session: Any) -> bool:
    """Whether every input and output has a free first (batch) dim, so requests may be joined along it."""
    specs = [*session.inputs, *session.outputs]
    return all(s.shape and not isinstance(s.shape[0], int) for s in specs)
