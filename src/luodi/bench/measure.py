"""What `luodi bench` measures on a package: per target, cold start and memory (in a fresh child process), latency
percentiles and throughput per batch and concurrency (targets interleaved round by round), luodi's own overhead
over the engine, and optionally the engine's per-operator profile. The result is one JSON-ready dict whose layout
docs/bench.md describes and :data:`luodi.bench.schema.SCHEMA` checks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..backends import LoadOptions, get_backend
from ..errors import InputError, LuodiError
from ..package import Package
from ..paths import child_env
from ..selection import label, parse_target, target_status
from ..session import Session
from ..tensor import TensorSpec
from ..verify import sample_inputs
from ._child import status_kb
from .profile import profile_target
from .schema import SCHEMA_VERSION

ROUNDS = 5
"""Each (batch, concurrency) cell is measured in this many rounds; in each round every target runs one block."""
WARMUP = 2
OVERHEAD_BLOCKS = 20
"""luodi's overhead is measured in this many pairs of blocks (Session.run, then the engine's run, alternating)."""
HISTOGRAM_BINS = 24


@dataclass
class Plan:
    """What to measure. ``duration`` (seconds) or ``iterations`` (calls per stream) per target per cell."""

    package: Path
    targets: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1])
    concurrency: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None
    duration: float | None = None
    iterations: int | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    samples: list[dict[str, np.ndarray]] | None = None
    profile: bool = False
    top: int = 20
    cold_start: bool = True
    overhead: bool = True
    per_stream_sessions: bool = False
    """Each stream its own Session (else the streams share one, as luodi serve's batcher threads do)."""
    source: str = "package"
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name, values in (("--batch", self.batches), ("--concurrency", self.concurrency)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise InputError(f"{name} takes integers >= 1 such as 1,8; got {values}")
        if self.duration is not None and self.iterations is not None:
            raise InputError("give --duration or --iterations, not both")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"--duration must be > 0 seconds, got {self.duration}")
        if self.iterations is not None and self.iterations < 1:
            raise InputError(f"--iterations must be >= 1, got {self.iterations}")
        if self.top < 1:
            raise InputError(f"--top must be >= 1, got {self.top}")
        if self.duration is None and self.iterations is None:
            self.duration = 2.0


Progress = Callable[[str], None]


def choose_targets(pkg: Package, asked: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The package's targets to measure: those asked for by ``BACKEND[:PRECISION]`` (an InputError for one the package
    lacks or that failed), else every target that compiled and whose engine runs here, the reference evaluator left
    out. Also those left out, with why."""
    chosen: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    have = ", ".join(label(t) for t in pkg.targets)
    if asked:
        for name in asked:
            backend, precision = parse_target(name)
            matches = [t for t in pkg.targets if t["backend"] == backend and precision in (None, t["precision"])]
            if not matches:
                raise InputError(f"the package has no target '{name}'; it has: {have}")
            for t in matches:
                state, why = target_status(t)
                if state == "failed":
                    raise InputError(f"target {label(t)} failed at compile time ({why}); it cannot be measured")
                avail = get_backend(t["backend"]).available()
                if not avail.ok:
                    raise InputError(f"target {label(t)} cannot run here: {avail.reason}")
                if t not in chosen:
                    chosen.append(t)
        return chosen, skipped
    for t in pkg.targets:
        state, why = target_status(t)
        if state == "failed":
            skipped.append({"target": label(t), "reason": f"failed at compile time: {why}"})
            continue
        if t["backend"] == "reference":
            skipped.append({"target": label(t), "reason": "the reference evaluator (ask for it with -t reference)"})
            continue
        try:
            avail = get_backend(t["backend"]).available()
        except LuodiError as exc:
            skipped.append({"target": label(t), "reason": str(exc)})
            continue
        if not avail.ok:
            skipped.append({"target": label(t), "reason": f"cannot run here: {avail.reason}"})
            continue
        chosen.append(t)
    if not chosen:
        raise InputError(f"no target of the package runs here ({have}); install an engine or give -t")
    return chosen, skipped


def batch_feeds(inputs: list[TensorSpec], base: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray] | None:
    """``base`` (one set of inputs) at batch size ``batch`` on each input's first axis (repeated, not random, so every
    target gets the same values); None when an input's first axis is fixed at another size."""
    out = {}
    for spec in inputs:
        array = base[spec.name]
        if array.ndim == 0:
            out[spec.name] = array
            continue
        if spec.shape and isinstance(spec.shape[0], int):
            if spec.shape[0] != batch:
                return None
            out[spec.name] = array
            continue
        one = array[:1]
        out[spec.name] = np.ascontiguousarray(np.repeat(one, batch, axis=0))
    return out


def base_feeds(pkg: Package, plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """One set of inputs: the first ``--sample``, else random values at ``--input-shape`` or the package's primary
    representative shapes."""
    inputs = pkg.inputs
    if plan.samples:
        sample = plan.samples[0]
        names = {s.name for s in inputs}
        if set(sample) != names:
            raise InputError(f"--sample must hold exactly the inputs {sorted(names)}; it holds {sorted(sample)}")
        feeds = {s.name: np.asarray(sample[s.name]) for s in inputs}
    else:
        shapes: dict[str, Any] = dict(pkg.representative_shapes[0]) if pkg.representative_shapes else {}
        for name, dims in (plan.shapes or {}).items():
            if name not in {s.name for s in inputs}:
                raise InputError(
                    f"--input-shape names '{name}', which is no input; the inputs: {[s.name for s in inputs]}"
                )
            shapes[name] = tuple(dims)
        feeds = sample_inputs(inputs, count=1, shapes=shapes)[0]
    return feeds, {n: list(a.shape) for n, a in feeds.items()}


def cold_start(
    package: Path, target: str, threads: int | None, feeds_file: str, timeout: float = 300
) -> dict[str, Any]:
    """Import, load, first and second inference and memory of ``target`` in a fresh Python (see _child.py)."""
    request = json.dumps(
        {"package": str(package), "target": target, "threads": threads, "feeds": feeds_file, "spawned": time.time()}
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "luodi.bench._child"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the cold-start child did not finish in {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:300]
        return {"error": f"the cold-start child failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(ns: np.ndarray, samples: int, wall_s: float, batch: int, concurrency: int) -> dict[str, Any]:
    """Percentiles, throughput and a histogram of per-call latencies (nanoseconds)."""
    ms = ns / 1e6
    p25, p50, p75, p90, p99 = (float(v) for v in np.percentile(ms, [25, 50, 75, 90, 99]))
    counts, edges = np.histogram(ms, bins=HISTOGRAM_BINS)
    return {
        "batch": batch,
        "concurrency": concurrency,
        "calls": int(ms.size),
        "samples": samples,
        "wall_s": wall_s,
        "min_ms": float(ms.min()),
        "p25_ms": p25,
        "p50_ms": p50,
        "p75_ms": p75,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "throughput_per_s": samples / wall_s if wall_s > 0 else 0.0,
        "histogram": {"edges_ms": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def run_block(fns: list[Callable[[], Any]], calls: int | None, seconds: float | None) -> tuple[list[int], float]:
    """One thread per function of ``fns`` (a stream), each calling it ``calls`` times or for ``seconds``: per-call
    nanoseconds of every stream, and the wall seconds from the common start to the last stream's end."""
    clock = time.perf_counter_ns
    streams = len(fns)
    lists: list[list[int]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def loop(fn: Callable[[], Any], out: list[int], start: threading.Barrier | None) -> None:
        if start is not None:
            start.wait()
        deadline = None if seconds is None else clock() + int(seconds * 1e9)
        try:
            n = 0
            while True:
                t0 = clock()
                fn()
                t1 = clock()
                out.append(t1 - t0)
                n += 1
                if (calls is not None and n >= calls) or (deadline is not None and t1 >= deadline):
                    return
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    gc.collect()
    gc.disable()
    try:
        if streams == 1:
            t0 = time.perf_counter()
            loop(fns[0], lists[0], None)
            wall = time.perf_counter() - t0
        else:
            barrier = threading.Barrier(streams + 1)
            workers = [
                threading.Thread(target=loop, args=(fns[i], lists[i], barrier), daemon=True) for i in range(streams)
            ]
            for w in workers:
                w.start()
            barrier.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
    finally:
        gc.enable()
    if errors:
        raise errors[0]
    return [t for lst in lists for t in lst], wall


def accuracy_of(target: dict[str, Any]) -> dict[str, Any] | None:
    """The target's agreement with the reference from the package's verification table: the lowest output cosine
    (one yardstick for every target, so that the Pareto front compares like with like), with an int8 target's top-1
    agreement alongside where quantisation measured one; the top-1 agreement alone where no cosine was recorded; None
    when the target was not verified."""
    quant = target.get("quantization") or {}
    top1 = float(quant["agreement"]) if isinstance(quant.get("agreement"), (int, float)) else None
    ver = target.get("verification") or {}
    if ver.get("reference"):
        return {"metric": "cosine", "value": 1.0}
    outputs = (ver.get("outputs") or {}).values()
    cosines = [o["cosine"] for o in outputs if isinstance(o.get("cosine"), (int, float))]
    if cosines:
        found: dict[str, Any] = {"metric": "cosine", "value": float(min(cosines))}
        if top1 is not None:
            found["top1_agreement"] = top1
        return found
    return None if top1 is None else {"metric": "top1_agreement", "value": top1}


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The targets no other target beats on both latency (lower) and accuracy (higher), fastest first. Accuracy is
    compared to 6 decimals: a cosine of 0.9999999999999962 is no better than one of 0.9999999999999848."""
    points = {n: (lat, round(acc, 6)) for n, (lat, acc) in points.items()}
    front = []
    for name, (lat, acc) in points.items():
        dominated = any(
            (ol <= lat and oa >= acc) and (ol < lat or oa > acc) for other, (ol, oa) in points.items() if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def host_info() -> dict[str, Any]:
    from ..timing import cpu_name, host_key

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "key": host_key(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load,
    }


def bench(plan: Plan, progress: Progress | None = None, advance: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Measure ``plan`` and return the report (see docs/bench.md). ``progress(text)`` is told what runs now and
    ``advance(n)`` each block done (for a progress bar); :func:`block_count` says how many there are."""
    plan.check()
    say = progress or (lambda _text: None)
    step = advance or (lambda _n: None)
    pkg = Package(plan.package)
    targets, skipped = choose_targets(pkg, plan.targets)
    names = [label(t) for t in targets]
    base, base_shapes = base_feeds(pkg, plan)
    sizes = {n: f["size"] for n, f in pkg.manifest["files"].items()}
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        rows[label(t)] = {
            "target": label(t),
            "backend": t["backend"],
            "precision": t["precision"],
            "engine_version": t.get("engine_version", ""),
            "artifact_bytes": int(sum(sizes.get(m, 0) for m in t["files"].values())),
            "accuracy": accuracy_of(t),
            "cold_start": None,
            "engine_memory_mb": None,
            "results": [],
            "overhead": None,
            "profile": None,
            "error": None,
        }

    with tempfile.TemporaryDirectory(prefix="luodi-bench-") as tmp:
        if plan.cold_start:
            feeds_file = os.path.join(tmp, "feeds.npz")
            np.savez(feeds_file, **base)
            for name in names:
                say(f"cold start of {name} in a fresh process")
                rows[name]["cold_start"] = cold_start(plan.package, name, plan.threads, feeds_file)
                step(1)

    sessions: dict[str, Session] = {}
    extra: dict[str, list[Session]] = {}  # --per-stream-sessions: the further streams' own sessions
    try:
        for name in list(names):
            say(f"loading {name}")
            try:
                sessions[name] = Session(plan.package, backend=name, threads=plan.threads)
                if plan.per_stream_sessions:
                    extra[name] = []
                    for _ in range(max(plan.concurrency) - 1):
                        extra[name].append(Session(plan.package, backend=name, threads=plan.threads))
            except LuodiError as exc:
                rows[name]["error"] = str(exc)
                names.remove(name)
        cells: list[tuple[int, int, dict[str, np.ndarray]]] = []  # (batch, streams, feeds)
        for batch in plan.batches:
            feeds = batch_feeds(pkg.inputs, base, batch)
            if feeds is None:
                plan.notes.append(f"batch {batch} skipped: the model's batch axis is fixed")
                step(len(plan.concurrency) * ROUNDS * len(names))
                continue
            for name in names:
                try:
                    for _ in range(WARMUP):
                        for session in [sessions[name], *extra.get(name, [])]:
                            session.run(feeds)
                except LuodiError as exc:
                    rows[name]["error"] = rows[name]["error"] or f"batch {batch}: {exc}"
            cells += [(batch, streams, feeds) for streams in plan.concurrency]
        live = [n for n in names if rows[n]["error"] is None]
        times: dict[tuple[str, int, int], list[int]] = {(n, b, c): [] for n in live for b, c, _ in cells}
        walls = dict.fromkeys(times, 0.0)
        calls = None if plan.iterations is None else max(1, -(-plan.iterations // ROUNDS))
        seconds = None if plan.duration is None else plan.duration / ROUNDS
        # Every round runs every cell (batch, streams) for every target, cells and targets in an order that rotates:
        # a burst of load from elsewhere falls on all targets and all cells alike, batch scaling included.
        for r in range(ROUNDS):
            for k, (batch, streams, feeds) in enumerate(cells[r % len(cells) :] + cells[: r % len(cells)]):
                shift = (r + k) % len(live) if live else 0
                for name in live[shift:] + live[:shift]:
                    say(f"round {r + 1}/{ROUNDS}: {name}, batch {batch}, {streams} stream(s)")
                    own = [sessions[name]] + extra.get(name, [])
                    fns = [(lambda s=own[i % len(own)], f=feeds: s.run(f)) for i in range(streams)]
                    ns, wall = run_block(fns, calls, seconds)
                    times[name, batch, streams] += ns
                    walls[name, batch, streams] += wall
                    step(1)
        for name in live:
            for batch, streams, _ in cells:
                ns = np.asarray(times[name, batch, streams], dtype=np.int64)
                rows[name]["results"].append(
                    summarise(ns, ns.size * batch, walls[name, batch, streams], batch, streams)
                )
        if plan.overhead:
            overhead(pkg, targets, sessions, base, plan, rows, say, step)
    finally:
        for s in [*sessions.values(), *(e for group in extra.values() for e in group)]:
            s.close()
    if plan.profile:
        model = None
        with contextlib.suppress(LuodiError):  # without onnx the engine's names are shown unmapped
            model = pkg.model()
        for t in targets:
            name = label(t)
            say(f"profiling {name}")
            rows[name]["profile"] = profile_target(pkg, t, base, plan.threads, plan.top, model)
            step(1)

    points = {
        n: (r["results"][0]["p50_ms"], r["accuracy"]["value"])
        for n, r in rows.items()
        if r["results"] and r["accuracy"] is not None
    }
    return {
        "schema": SCHEMA_VERSION,
        "luodi_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "model": {
            "name": pkg.name,
            "path": str(plan.package),
            "source": plan.source,
            "package_bytes": plan.package.stat().st_size,
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in pkg.inputs],
        },
        "settings": {
            "batches": plan.batches,
            "concurrency": plan.concurrency,
            "threads": plan.threads,
            "duration_s": plan.duration,
            "iterations": plan.iterations,
            "rounds": ROUNDS,
            "warmup": WARMUP,
            "shapes": base_shapes,
            "inputs_from": "sample" if plan.samples else "random",
            "profile": plan.profile,
            "streams": "one session each" if plan.per_stream_sessions else "sharing one session",
        },
        "targets": [rows[label(t)] for t in targets],
        "skipped": skipped,
        "pareto": pareto(points),
        "process_peak_rss_mb": (status_kb("VmHWM") or 0) / 1024,
        "notes": plan.notes,
    }


def block_count(plan: Plan, targets: int) -> int:
    """How many steps :func:`bench` reports through ``advance`` for ``targets`` targets."""
    n = targets * (1 if plan.cold_start else 0)
    n += len(plan.batches) * len(plan.concurrency) * ROUNDS * targets
    n += targets if plan.overhead else 0
    n += targets if plan.profile else 0
    return n


def overhead(
    pkg: Package,
    targets: list[dict[str, Any]],
    sessions: dict[str, Session],
    base: dict[str, np.ndarray],
    plan: Plan,
    rows: dict[str, dict[str, Any]],
    say: Progress,
    step: Callable[[int], None],
) -> None:
    """luodi's cost per call: ``Session.run`` against the backend engine's ``run`` (luodi.backends.open_engine: the
    engine's own call with the input names checked) on the same inputs and the same artifact, in alternating
    blocks at batch 1 (or the first batch that runs): the median over the pairs of blocks of the difference of their
    medians, so that a slow drift of the machine's load cancels."""
    feeds = next((f for b in plan.batches if (f := batch_feeds(pkg.inputs, base, b)) is not None), None)
    for t in targets:
        name = label(t)
        if name not in sessions or rows[name]["error"] is not None or feeds is None:
            step(1)
            continue
        say(f"luodi's overhead on {name}")
        try:
            engine = get_backend(t["backend"]).load(pkg.artifact(t), LoadOptions(threads=plan.threads))
        except LuodiError as exc:
            rows[name]["overhead"] = {"error": str(exc)}
            step(1)
            continue
        try:
            dtypes = {s.name: s.np_dtype for s in engine.inputs}
            own = {n: a.astype(dtypes[n], copy=False) if n in dtypes else a for n, a in feeds.items()}
            session = sessions[name]
            for _ in range(WARMUP):
                engine.run(own)
            sides: dict[str, list[int]] = {"session": [], "engine": []}
            fns = {
                "session": lambda s=session, f=feeds: s.run(f),
                "engine": lambda e=engine, f=own: e.run(f),
            }
            calls = None if plan.iterations is None else max(1, -(-plan.iterations // OVERHEAD_BLOCKS))
            seconds = None if plan.duration is None else plan.duration / OVERHEAD_BLOCKS / 2
            pairs = []  # per pair of adjacent blocks: the difference of their medians (drift cancels)
            for r in range(OVERHEAD_BLOCKS):
                block = {}
                for side in ("session", "engine") if r % 2 == 0 else ("engine", "session"):
                    block[side] = run_block([fns[side]], calls, seconds)[0]
                    sides[side] += block[side]
                pairs.append(float(np.median(block["session"]) - np.median(block["engine"])))
        finally:
            engine.close()
        rows[name]["overhead"] = {
            "session_p50_ms": float(np.median(sides["session"])) / 1e6,
            "engine_p50_ms": float(np.median(sides["engine"])) / 1e6,
            "overhead_us": float(np.median(pairs)) / 1e3,
            "calls": len(sides["session"]),
        }
        step(1)
