"""What running the engine in a worker process (``isolate``) costs, on EfficientNet-Lite0 (onnxruntime fp32).

What it measures
----------------
1. ``Session.run`` in-process against ``Session(..., isolate=True)`` (the engine in a child process, the tensors
   through shared memory) at batch 1 and batch 8: images per second, the sides alternating round by round so
   that noise on a shared machine hits both; and the fixed cost of one call through the worker, measured on a
   tiny model (a [1, 3, 16, 16] CNN) where the engine's own time is a few microseconds; and ``Session.run`` from
   4 threads at batch 1: in-process, through a worker with 1 slot (calls serialised) and with 4 (the default).
2. ``luodi serve --no-isolate`` against ``luodi serve --isolate`` under the same client as benchmarks/serve.py
   (KServe v2 binary tensors over loopback, one image a request, dynamic batching up to 32) at 1, 16 and 64
   concurrent clients: requests per second and p50/p99 latency; and the resident memory of each server with
   its worker processes.

The first answer of every side is checked against in-process ``Session.run``. The script reports, it does not
assert.

Run::

    .venv/bin/python benchmarks/isolate.py                    # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/isolate.py --seconds 2 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import luodi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ServerProcess, _ort_version, check_answer, http_request, load  # noqa: E402

from luodi.serve.protocol import encode_infer_request  # noqa: E402

CONCURRENCY = (1, 16, 64)


def images_per_s(session: luodi.Session, x: np.ndarray, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run({"images": x})
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def call_overhead_us(rounds: int) -> dict[str, tuple[float, float]]:
    """(fastest, median) microseconds per run() of a tiny CNN, in-process and through the worker. The fastest
    call is the round trip's own cost; the median adds the wake-ups a busy machine makes it wait for."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import small_cnn

    x = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    with luodi.Session(small_cnn()) as a, luodi.Session(small_cnn(), isolate=True) as b:
        out = {}
        for name, s in (("in", a), ("worker", b)):
            s.run(x)
            times = []
            for _ in range(max(rounds, 1) * 1000):
                t0 = time.perf_counter()
                s.run(x)
                times.append(time.perf_counter() - t0)
            out[name] = (min(times) * 1e6, float(np.median(times)) * 1e6)
    return out


def threaded_images_per_s(pkg: Path, seconds: float, rounds: int, threads: int = 4) -> dict[str, float]:
    """Images/s of ``threads`` threads calling run() at batch 1 on one session: in-process, 1 slot, 4 slots."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    sides = {
        "in-process": luodi.Session(pkg, backend="onnxruntime"),
        "worker, 1 slot": luodi.Session(pkg, backend="onnxruntime", isolate=1),
        "worker, 4 slots": luodi.Session(pkg, backend="onnxruntime", isolate=4),
    }
    rates: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for s in sides.values():
            s.run({"images": x})
        for r in range(rounds):
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                rates[name].append(_threads_rate(sides[name], x, threads, seconds))
    finally:
        for s in sides.values():
            s.close()
    return {k: float(np.median(v)) for k, v in rates.items()}


def _threads_rate(session: luodi.Session, x: np.ndarray, threads: int, seconds: float) -> float:
    count = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            session.run({"images": x})
            count[i] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the worker processes), in MB."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each load, per side per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per figure (sides alternate)")
    ap.add_argument("--package", type=Path, help="an EfficientNet-Lite0 .luodi (default: compile the zoo's)")
    ap.add_argument("--no-serve", action="store_true", help="leave out the server figures")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        pkg = repo / "effnet.luodi"
        if args.package:
            shutil.copy(args.package, pkg)
        else:
            from luodi.zoo import efficientnet_lite0

            console.print("[dim]compiling zoo:efficientnet-lite0 ...[/]")
            luodi.compile(efficientnet_lite0(), pkg, targets=["onnxruntime"], verify=False)

        table = Table(title="Session.run, EfficientNet-Lite0 (onnxruntime fp32): in-process vs in a worker process")
        for col in ("batch", "in-process img/s", "worker img/s", "worker / in-process"):
            table.add_column(col, justify="right")
        with (
            luodi.Session(pkg, backend="onnxruntime") as a,
            luodi.Session(pkg, backend="onnxruntime", isolate=True) as b,
        ):
            for batch in (1, 8):
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                if not np.allclose(a.run({"images": x})["logits"], b.run({"images": x})["logits"], atol=1e-5):
                    raise SystemExit("the worker's logits differ from the in-process session's")
                rates: dict[str, list[float]] = {"in": [], "worker": []}
                for r in range(args.rounds * 2):
                    sides = [("in", a), ("worker", b)]
                    for name, s in sides if r % 2 == 0 else sides[::-1]:
                        rates[name].append(images_per_s(s, x, args.seconds / 2))
                ins, wk = float(np.median(rates["in"])), float(np.median(rates["worker"]))
                table.add_row(str(batch), f"{ins:.1f}", f"{wk:.1f}", f"{wk / ins:.3f}")
        console.print(table)
        tiny = call_overhead_us(args.rounds)
        console.print(
            "one run() of a tiny CNN, fastest / median: "
            f"in-process {tiny['in'][0]:.0f} / {tiny['in'][1]:.0f} us, "
            f"through the worker {tiny['worker'][0]:.0f} / {tiny['worker'][1]:.0f} us"
        )
        threaded = threaded_images_per_s(pkg, args.seconds, args.rounds * 2)
        console.print(
            "Session.run from 4 threads, batch 1, images/s: "
            + ", ".join(f"{k} {v:.1f} ({v / threaded['in-process']:.2f})" for k, v in threaded.items())
        )
        if not args.no_serve:
            serve_figures(console, repo, pkg, args.seconds, args.rounds)
        console.print(
            f"[dim]{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the end, "
            f"Python {platform.python_version()}, onnxruntime {_ort_version()}, "
            f"{args.rounds} round(s) x {args.seconds:g} s per side[/]"
        )


def serve_figures(console: Console, repo: Path, pkg: Path, seconds: float, rounds: int) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with luodi.Session(pkg, backend="onnxruntime") as s:
        want = s.run({"images": x})["logits"]
    body, n = encode_infer_request({"images": x})
    flags = ("-b", "onnxruntime", "--max-batch-size", "32")
    servers: dict[str, ServerProcess] = {}
    results: dict[tuple[str, int], dict[str, list]] = {}
    memory = {}
    try:
        for side, flag in (("in-process", "--no-isolate"), ("isolated", "--isolate")):
            servers[side] = ServerProcess(repo, *flags, flag)
        for side, srv in servers.items():
            _, _, errors, first = load(srv.port, http_request(srv.port, body, n), 4, 1.0)
            if errors or not first:
                raise SystemExit(f"{side}: warm-up failed: {errors[:3]}")
            check_answer(first, want, side)
            memory[side] = rss_mb(srv.proc.pid)
        order = list(servers)
        for clients in CONCURRENCY:
            for r in range(rounds):
                for side in order[r % 2 :] + order[: r % 2]:
                    srv = servers[side]
                    lat, wall, errors, _ = load(srv.port, http_request(srv.port, body, n), clients, seconds)
                    acc = results.setdefault((side, clients), {"lat": [], "wall": []})
                    acc["lat"] += lat
                    acc["wall"].append(wall)
                    if errors:
                        console.print(f"[yellow]{side}, {clients} clients: {len(errors)} errors, e.g. {errors[0]}")
    finally:
        for srv in servers.values():
            srv.stop()

    def figures(side: str, clients: int) -> tuple[float, float, float]:
        acc = results[(side, clients)]
        ms = np.array(acc["lat"]) * 1000
        return len(ms) / sum(acc["wall"]), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))

    table = Table(title="luodi serve, EfficientNet-Lite0 (onnxruntime fp32): --no-isolate vs --isolate")
    for col in ("clients", "in-process req/s", "p50 ms", "p99 ms", "isolated req/s", "p50 ms", "p99 ms", "ratio"):
        table.add_column(col, justify="right")
    for clients in CONCURRENCY:
        a, b = figures("in-process", clients), figures("isolated", clients)
        table.add_row(str(clients), *(f"{v:.1f}" for v in a), *(f"{v:.1f}" for v in b), f"{b[0] / a[0]:.3f}")
    console.print(table)
    console.print(
        f"resident memory after warm-up (server and its workers): in-process {memory['in-process']:.0f} MB, "
        f"isolated {memory['isolated']:.0f} MB"
    )


if __name__ == "__main__":
    main()
