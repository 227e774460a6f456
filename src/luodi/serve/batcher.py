"""Dynamic batching: requests queued for one model are joined along the batch axis and run by worker threads.

Plain threads and concurrent futures, no event loop or web framework, so any server (HTTP, Ray) can use it.
Only requests whose inputs agree in every dim but the first, and in dtype, ever share a batch. Joining and
splitting is luodi.batch's, as for Session.run_batch; this module adds the queue, deadlines and workers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .. import batch as core
from ..errors import InputError, LuodiError, ModelUnavailableError, OverloadedError, RequestTimeoutError

log = logging.getLogger("luodi.serve")

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchConfig:
    """How one model batches. ``max_batch_size`` <= 1 runs every request on its own."""

    max_batch_size: int = 32
    # How long the oldest request may wait for others to join its batch. 0 (Triton's default too): a worker that
    # falls idle takes whatever is queued at once, and under load batches still fill with the requests that
    # arrived while the engine ran. benchmarks/serve.py (EfficientNet-Lite0, 2 cores): 0 ms gave 182 req/s at one
    # client against 121 with 2 ms (each lone request waited the whole delay), and the same at 16 and 64 clients.
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256  # requests waiting; beyond this a request is refused at once (OverloadedError)
    timeout_s: float = 30.0  # per request, queueing and computing together
    instances: int = 1  # worker threads, each running one batch at a time
    isolate: bool | None = None  # run the engine in a worker process (luodi.worker); None: the server's --isolate
    # A request that finds nothing queued and nothing running skips the hand-off to a worker thread and back when
    # lone runs of its input shapes have lately taken under this long: the caller (the server's event loop) runs it.
    # benchmarks/serve.py --tiny measures what the hand-off costs; 0 turns this off.
    max_inline_ms: float = 1.0

    def __post_init__(self) -> None:
        bad = []
        if self.max_batch_size < 0:
            bad.append(f"max_batch_size {self.max_batch_size} < 0")
        if self.max_queue_delay_ms < 0:
            bad.append(f"max_queue_delay_ms {self.max_queue_delay_ms} < 0")
        if self.max_queue_size < 1:
            bad.append(f"max_queue_size {self.max_queue_size} < 1")
        if self.timeout_s <= 0:
            bad.append(f"timeout_s {self.timeout_s} <= 0")
        if self.instances < 1:
            bad.append(f"instances {self.instances} < 1")
        if self.max_inline_ms < 0:
            bad.append(f"max_inline_ms {self.max_inline_ms} < 0")
        if self.isolate not in (None, True, False):
            bad.append(f"isolate {self.isolate!r} is not true or false")
        if any(p < 1 or p > max(self.max_batch_size, 1) for p in self.preferred_batch_sizes):
            bad.append(f"preferred_batch_sizes {list(self.preferred_batch_sizes)} must lie in 1..max_batch_size")
        if bad:
            raise InputError("invalid batching settings: " + "; ".join(bad))
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes))))


@dataclass(eq=False)
class Job:
    """One request in the batcher. ``future`` resolves to its outputs; the timings are set once it ran."""

    feeds: Feeds
    size: int
    key: tuple
    deadline: float
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    queue_s: float = 0.0
    compute_s: float = 0.0
    input_s: float = 0.0  # joining the batch's inputs (0 for a request that ran alone: nothing to join)
    output_s: float = 0.0  # splitting the batch's outputs back into requests
    batch_size: int = 0  # rows of the engine call it shared
    requests: int = 0  # requests that shared it
    inline: bool = False  # run by its caller's thread (Batcher.run_inline), not by a worker


_LONE_SHAPES = 64  # input shape sets whose lone run time a batcher keeps


def _shapes(feeds: Feeds) -> tuple:
    return tuple((n, a.shape, a.dtype) for n, a in feeds.items())


class Batcher:
    """A bounded queue for one model and ``config.instances`` worker threads that run ``run`` on joined batches.

    ``batchable`` says whether the model has a free batch dim on every input and output; when False every
    request runs alone. ``on_batch(size, compute_s, input_s, output_s)`` is called after each batch that ran
    (for metrics): its rows, the engine's time, and the time to join its inputs and split its outputs.
    """

    def __init__(
        self,
        run: Callable[[Feeds], Feeds],
        config: BatchConfig,
        *,
        batchable: bool = True,
        name: str = "model",
        on_batch: Callable[[int, float, float, float], None] | None = None,
    ) -> None:
        self.config = config
        self.batchable = batchable and config.max_batch_size > 1
        self._run = run
        self._on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        self._compute_ema = 0.0  # seconds per batch, for Retry-After
        # seconds per engine call of one request alone, by its inputs' shapes and dtypes (for run_inline: a request
        # of shapes not yet run alone, e.g. a far larger image, is never run inline on a guess)
        self._lone: dict[tuple, float] = {}
        self._workers = [
            threading.Thread(target=self._work, name=f"luodi-batcher-{name}-{i}", daemon=True)
            for i in range(config.instances)
        ]
        for w in self._workers:
            w.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Batches running now."""
        return self._busy

    def submit(self, feeds: Feeds, timeout_s: float | None = None) -> Job:
        """Queue one request; its ``future`` gives the outputs. A full queue raises OverloadedError at once."""
        size, key = self._size_key(feeds)
        now = time.perf_counter()
        job = Job(feeds, size, key, now + (timeout_s or self.config.timeout_s), enqueued=now)
        with self._cond:
            if self._closed:
                raise ModelUnavailableError("this model version is shutting down; retry, a newer one may be serving")
            if len(self._queue) >= self.config.max_queue_size:
                raise OverloadedError(
                    f"the model's queue is full ({len(self._queue)} requests waiting); retry later",
                    self._retry_after(),
                )
            self._queue.append(job)
            self._cond.notify()
        return job

    def _size_key(self, feeds: Feeds) -> tuple[int, tuple]:
        """A request's rows and the key of the requests it may share a batch with."""
        if not self.batchable:
            return 1, (object(),)  # never equal to another request's key: runs alone
        size = core.rows_of(feeds)
        if size > self.config.max_batch_size:
            raise InputError(
                f"a request of batch {size} is larger than the model's max_batch_size "
                f"{self.config.max_batch_size}; split it into smaller requests"
            )
        return size, core.shape_key(feeds)

    def inline_ok(self, feeds: Feeds) -> bool:
        """Whether run_inline would run ``feeds`` now: nothing queued or running, lone runs of these very shapes
        quick lately, and no queue delay asked for (a lone request waits that long for partners)."""
        cfg = self.config
        lone = self._lone.get(_shapes(feeds), math.inf)
        return lone * 1000 < cfg.max_inline_ms and not cfg.max_queue_delay_ms and not self._queue and not self._busy

    def run_inline(self, feeds: Feeds, timeout_s: float | None = None) -> Job | None:
        """Run one request in the calling thread when nothing is queued or running and lone runs of its input shapes
        have lately been shorter than ``config.max_inline_ms``; else None (``submit`` it). The job comes back done."""
        if not self.inline_ok(feeds):
            return None
        with self._cond:
            if self._queue or self._busy or self._closed:
                return None
            self._busy += 1
        release = self._releaser()  # and a worker takes what another thread queued meanwhile
        try:
            size, key = self._size_key(feeds)
            now = time.perf_counter()
            job = Job(feeds, size, key, now + (timeout_s or self.config.timeout_s), enqueued=now, inline=True)
            self._execute([job], release)
        finally:
            release()
        return job

    def close(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish every queued one first, else fail them. Joins the workers."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.set_exception(ModelUnavailableError("the model was unloaded"))
            self._cond.notify_all()
        for w in self._workers:
            w.join(timeout_s)

    # -- workers -------------------------------------------------------------------------------
    def _retry_after(self) -> int:
        per_batch = self._compute_ema or 0.05
        batches = len(self._queue) / max(self.config.max_batch_size, 1) / len(self._workers)
        return max(1, math.ceil(batches * per_batch))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
                if batch:
                    self._busy += 1
            if batch:
                release = self._releaser()
                try:
                    self._execute(batch, release)
                finally:
                    release()

    def _releaser(self) -> Callable[[], None]:
        """Once called (again: nothing), a running batch no longer counts as busy, and a worker takes what queued
        meanwhile. _execute calls it before it hands out the outputs, so that a caller who has its answer finds
        the batcher idle (run_inline)."""
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                with self._cond:
                    self._busy -= 1
                    if self._queue:
                        self._cond.notify()

        return release

    def _take(self) -> list[Job]:
        """With the lock held: the next batch, waiting up to the delay for same-shaped requests to join."""
        cfg = self.config
        while self._queue:
            first = self._queue[0]
            batch, total = [], 0
            for job in self._queue:
                if job.key == first.key and total + job.size <= max(cfg.max_batch_size, 1):
                    batch.append(job)
                    total += job.size
                    if total == cfg.max_batch_size:
                        break
            remaining = first.enqueued + cfg.max_queue_delay_ms / 1000 - time.perf_counter()
            full = not self.batchable or total >= cfg.max_batch_size
            preferred = cfg.preferred_batch_sizes and total >= cfg.preferred_batch_sizes[-1]
            if full or preferred or remaining <= 0 or self._closed:
                break
            self._cond.wait(remaining)
        else:
            return []
        if cfg.preferred_batch_sizes:  # the longest prefix of a preferred size, if there is one
            sums = np.cumsum([j.size for j in batch]).tolist()
            fits = [i for i, s in enumerate(sums) if s in cfg.preferred_batch_sizes]
            if fits:
                batch = batch[: fits[-1] + 1]
        for job in batch:
            self._queue.remove(job)
        return batch

    def _execute(self, batch: list[Job], release: Callable[[], None]) -> None:
        now = time.perf_counter()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client gave up (cancelled)
            if now > job.deadline:
                job.future.set_exception(
                    RequestTimeoutError(f"the request waited {now - job.enqueued:.3f} s in the queue, past its timeout")
                )
                continue
            live.append(job)
        if not live:
            return
        t_join = time.perf_counter()
        feeds, rows = core.join([j.feeds for j in live]) if len(live) > 1 else (live[0].feeds, [live[0].size])
        total = sum(rows)
        t0 = time.perf_counter()
        try:
            outputs = self._run(feeds)
        except BaseException as exc:  # the engine's failure goes to every caller of the batch
            release()
            for job in live:
                job.future.set_exception(exc)
            return
        t1 = time.perf_counter()
        compute = t1 - t0
        self._compute_ema = compute if not self._compute_ema else 0.8 * self._compute_ema + 0.2 * compute
        if len(live) == 1:
            shapes, lone = _shapes(live[0].feeds), self._lone
            if shapes not in lone and len(lone) >= _LONE_SHAPES:
                lone.clear()  # many shapes: start over rather than grow without bound
            lone[shapes] = 0.8 * lone[shapes] + 0.2 * compute if shapes in lone else compute
        try:  # a lone request gets its outputs whole, batch axis or not
            parts: list[Feeds] | LuodiError = core.split(outputs, rows) if len(live) > 1 else [outputs]
        except LuodiError as exc:
            parts = exc
        joined, split = t0 - t_join, time.perf_counter() - t1
        if self._on_batch is not None:
            self._on_batch(total, compute, joined, split)
        release()
        for i, job in enumerate(live):
            job.queue_s, job.compute_s, job.batch_size, job.requests = t_join - job.enqueued, compute, total, len(live)
            job.input_s, job.output_s = joined, split
            if isinstance(parts, LuodiError):
                job.future.set_exception(parts)
            else:
                job.future.set_result(parts[i])
