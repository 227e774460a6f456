"""Latency of compiled targets on this host: measured side by side (measure, measure_many), cached per host and
package (TimingCache), or stored in the package by ``compile --tune`` (known_timings). The compiler's ``tune`` and
auto-selection both use it; it chooses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Artifact, Engine, LoadOptions, get_backend
from .errors import BackendError, LuodiError
from .package import Package
from .paths import cache_dir
from .tensor import TensorSpec
from .verify import sample_inputs

TIMING_RUNS = 10


def label(target: dict[str, Any]) -> str:
    """A target's name as the CLI's ``--target`` takes it: ``"openvino:int8"``."""
    return f"{target['backend']}:{target['precision']}"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def host_key() -> str:
    """What makes timings comparable: CPU model, core count, OS and machine."""
    raw = f"{platform.system()}|{platform.machine()}|{cpu_name()}|{os.cpu_count()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def measure(
    artifact: Artifact,
    inputs: list[TensorSpec],
    device: str = "cpu",
    runs: int = TIMING_RUNS,
    shapes: dict[str, Any] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
) -> float:
    """Median latency of a compiled target on this host, in milliseconds.

    ``shapes`` (the package's primary representative set) fixes free dims a model cannot run at 1, such as the
    height and width of a detector's image; ``feeds`` gives the very inputs instead.
    """
    timings, failed = measure_many({"target": artifact}, inputs, device, runs, shapes, feeds)
    if failed:
        raise BackendError(failed["target"])
    return timings["target"]


def measure_many(
    artifacts: dict[str, Artifact],
    inputs: list[TensorSpec],
    device: str = "cpu",
    runs: int = TIMING_RUNS,
    shapes: dict[str, Any] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    domains: dict[str, Any] | None = None,
    load_options: dict[str, LoadOptions] | None = None,
    keep_open: dict[str, Engine] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median latency (ms) of several targets at ``shapes`` (or on ``feeds``), measured side by side; and those
    that failed, with why. Generated inputs take their values from ``domains`` (a constant input, e.g. a sample
    rate, must keep its value for the model to run).

    Each target loads with ``load_options[name]`` (else on ``device`` with the defaults). With ``keep_open`` (a
    dict) the engines that were timed are put there, open, for the caller to keep one and close the rest; else
    they are closed here.

    The targets take turns in rounds (the order rotating each round), so a burst of load on a shared
    machine slows every candidate alike instead of deciding the choice.
    """
    if feeds is None:
        feeds = sample_inputs(inputs, count=1, shapes=shapes, domains=domains)[0]
    engines: dict[str, Any] = {}
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    own: dict[str, dict[str, np.ndarray]] = {}
    try:
        for name, artifact in artifacts.items():
            try:
                options = (load_options or {}).get(name) or LoadOptions(device=device)
                engine = get_backend(artifact.backend).load(artifact, options)
                engines[name] = engine
                # A target with int8 I/O reads integers: for timing, the same feeds in the engine's own dtypes.
                dtypes = {s.name: s.np_dtype for s in engine.inputs}
                own[name] = {n: a if n not in dtypes else a.astype(dtypes[n], copy=False) for n, a in feeds.items()}
                engine.run(own[name])  # warm-up: first runs allocate and may compile kernels
                engine.run(own[name])
                times[name] = []
            except LuodiError as exc:  # one broken target must not stop the others from being timed
                failed[name] = str(exc)
            except Exception as exc:  # an engine failing on the timing input: the same, in its own words
                failed[name] = f"{type(exc).__name__}: {exc}"
        order = list(times)
        per_round = 2
        for r in range((runs + per_round - 1) // per_round):
            for name in order[r % len(order) :] + order[: r % len(order)] if order else []:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    engines[name].run(own[name])
                    times[name].append(time.perf_counter() - t0)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    for name, engine in engines.items():
        if keep_open is not None and name in times:
            keep_open[name] = engine
        else:
            engine.close()
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}, failed


class TimingCache:
    """``<cache>/timings.json``: {host: {package sha256: {target: median ms}}}."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "timings.json"

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, package_id: str) -> dict[str, float]:
        return dict(self.load().get(host_key(), {}).get(package_id, {}))

    def put(self, package_id: str, timings: dict[str, float]) -> None:
        data = self.load()
        data.setdefault(host_key(), {}).setdefault(package_id, {}).update(timings)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".timings.")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home must not stop inference; we measure again next time


def known_timings(package: Package, device: str = "cpu") -> dict[str, float]:
    """Batch-1 latency per target label known on this host without measuring: stored in the package by
    ``compile --tune`` for this host and device, else cached here by an earlier auto-selection."""
    here = host_key()
    stored = {
        label(t): t["timing"]["median_ms"]
        for t in package.targets
        if t.get("timing", {}).get("host") == here and t["timing"].get("device") == device
    }
    return {**TimingCache().get(f"{package.manifest_sha256}:{device}"), **stored}
