"""The live figures of one model version: the web page's means (/luodi/models) and Triton's statistics extension
(GET /v2/models/NAME/stats). Prometheus has the histograms (luodi.serve.metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    """A count and a total time: Triton's $duration_stat."""

    count: int = 0
    s: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.s += seconds

    def as_triton(self) -> dict[str, int]:
        return {"count": self.count, "ns": round(self.s * 1e9)}


@dataclass
class BatchStat:
    """The engine calls of one batch size (rows): joining the inputs, running the engine, splitting the outputs."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Stats:
    """Live figures of one model version since it was loaded. Each answered request counts once in ``requests``;
    the timed figures are those of the successful requests that ran in a batch (a request answered with an error
    before it reached the batcher has no queue or compute time)."""

    requests: int = 0
    failures: int = 0
    total_s: float = 0.0  # successful requests, received to answer ready
    fail_s: float = 0.0  # failed requests, received to error answer ready
    timed: int = 0  # successful requests with a batcher job (the count of queue_s, compute_s, ...)
    queue_s: float = 0.0
    input_s: float = 0.0  # the batch's input join, charged to each request in it (as Triton charges a batch's times)
    compute_s: float = 0.0
    output_s: float = 0.0
    rows: int = 0  # rows (batch items) of the successful requests: Triton's inference_count
    batches: int = 0  # engine calls that succeeded: Triton's execution_count
    batched_items: int = 0
    last_ms: int = 0  # wall-clock time of the last answered request, milliseconds since the epoch (0: none yet)
    by_size: dict[int, BatchStat] = field(default_factory=dict)

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

    def batch(self, size: int, compute_s: float, input_s: float, output_s: float) -> None:
        """Account one engine call of ``size`` rows."""
        self.batches += 1
        self.batched_items += size
        stat = self.by_size.setdefault(size, BatchStat())
        stat.compute_input.add(input_s)
        stat.compute_infer.add(compute_s)
        stat.compute_output.add(output_s)

    def as_triton(self, name: str, version: str) -> dict[str, Any]:
        """The $model_stat object of Triton's statistics extension (docs/protocol/extension_statistics.md)."""
        ok = self.requests - self.failures

        def timed(seconds: float) -> dict[str, int]:
            return Duration(self.timed, seconds).as_triton()

        return {
            "name": name,
            "version": version,
            "last_inference": self.last_ms,
            "inference_count": self.rows,
            "execution_count": self.batches,
            "inference_stats": {
                "success": Duration(ok, self.total_s).as_triton(),
                "fail": Duration(self.failures, self.fail_s).as_triton(),
                "queue": timed(self.queue_s),
                "compute_input": timed(self.input_s),
                "compute_infer": timed(self.compute_s),
                "compute_output": timed(self.output_s),
                "cache_hit": Duration().as_triton(),  # luodi has no response cache: never a hit
                "cache_miss": Duration().as_triton(),  # ... nor a lookup that missed
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": s.compute_input.as_triton(),
                    "compute_infer": s.compute_infer.as_triton(),
                    "compute_output": s.compute_output.as_triton(),
                }
                for size, s in sorted(self.by_size.items())
            ],
        }
