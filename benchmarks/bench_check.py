"""`luodi bench` checked against the yardsticks, side by side in one run, on EfficientNet-Lite0 at batch 1.

What it measures
----------------
For each target of one package (onnxruntime, openvino, ncnn, mnn fp32 where installed), in rounds:

1. ``luodi bench``'s median latency (``luodi.bench.bench``, the code behind the command: Session.run, warm, targets
   interleaved);
2. the engine's own Python API on the package's very artifact files, with benchmarks/engines.py's runners (the
   yardstick that script compares luodi with);
3. for openvino, OpenVINO's own ``benchmark_app`` on the package's ``model.onnx`` at the same shape, thread count
   and precision (``-api sync -hint latency -infer_precision f32``, as luodi loads it; with ``--threads T``,
   ``-hint none -nstreams 1 -nthreads T``, what luodi's LATENCY hint with T threads gives): its reported median.
   benchmarks/engines.py's raw runners use each engine's default thread count, as luodi does without --threads.

4. with ``--serve``: ``luodi serve`` on the package (onnxruntime), loaded at 1 and 16 clients alternately by
   ``luodi bench --url`` (``luodi.bench.load.bench_url``) and by benchmarks/serve.py's own client (its ``load``),
   each for the same time: requests/s and p50 side by side (the acceptance: they agree within the noise).

Printed: each median per round and overall (the median of the rounds), the ratios luodi bench / raw API and luodi
bench / benchmark_app, and one met / NOT met line for the issue's acceptance (openvino within 10% of benchmark_app).
Rounds alternate the order of the sides so that noise on a shared machine hits all alike. It reports, it does not
assert.

Run::

    .venv/bin/python benchmarks/bench_check.py                      # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_check.py --seconds 2 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import luodi
from luodi.bench import Plan, bench

sys.path.insert(0, str(Path(__file__).parent))
from engines import RAW  # noqa: E402  (benchmarks/engines.py's raw runners)

TOLERANCE = 0.10
_MEDIAN = re.compile(r"Median:\s+([0-9.]+)\s*(ms|us)")


def raw_median(target: str, pkg: luodi.Package, x: np.ndarray, seconds: float) -> float:
    backend, precision = target.split(":")
    run = RAW[backend](pkg.artifact(pkg.find_target(backend, precision)))
    for _ in range(3):
        run(x)
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def benchmark_app(model: Path, threads: int | None, seconds: float) -> float | None:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    if not Path(exe).exists():
        return None
    # luodi loads with PERFORMANCE_HINT LATENCY and, given threads, INFERENCE_NUM_THREADS; benchmark_app takes a
    # thread count only without a hint, so then: no hint, one stream (what LATENCY gives), the same threads
    cmd = [exe, "-m", str(model), "-d", "CPU", "-api", "sync"]
    cmd += ["-hint", "latency"] if threads is None else ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)]
    cmd += ["-infer_precision", "f32", "-shape", "images[1,3,224,224]", "-t", str(max(1, round(seconds)))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = _MEDIAN.search(done.stdout)
    if done.returncode != 0 or not found:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise SystemExit(f"benchmark_app failed ({done.returncode}): {tail}")
    return float(found.group(1)) / (1000.0 if found.group(2) == "us" else 1.0)


def serve_check(path: Path, seconds: float, rounds: int, console: Console) -> None:
    """``luodi bench --url`` against benchmarks/serve.py's client on one `luodi serve`, alternating."""
    import serve as serve_bench  # benchmarks/serve.py

    from luodi.bench.load import bench_url
    from luodi.serve.protocol import encode_infer_request

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        shutil.copy(path, repo / "effnet.luodi")  # serve.py's client asks for model "effnet"
        server = serve_bench.ServerProcess(repo, "-b", "onnxruntime")
        try:
            x = np.random.default_rng(0).random((1, 3, 224, 224)).astype(np.float32)
            body, length = encode_infer_request({"images": x})
            request = serve_bench.http_request(server.port, body, length or 0)
            got: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for r in range(rounds):
                for clients in (1, 16):
                    for side in ("bench --url", "serve.py") if r % 2 == 0 else ("serve.py", "bench --url"):
                        if side == "serve.py":
                            latencies, wall, errors, _ = serve_bench.load(server.port, request, clients, seconds)
                            rate, p50 = len(latencies) / wall, statistics.median(latencies) * 1e3
                        else:
                            report = bench_url(server.base, "effnet", [1], [clients], seconds)
                            row = report["results"][0]
                            rate, p50 = row["throughput_per_s"], row["p50_ms"]
                        got.setdefault((side, clients), []).append((rate, p50))
                console.print(f"serve round {r + 1}/{rounds} done", style="dim")
        finally:
            server.stop()
    table = Table(
        title="luodi bench --url vs benchmarks/serve.py's client, one luodi serve (onnxruntime), EfficientNet"
    )
    for col in ("clients", "bench --url req/s", "serve.py req/s", "ratio", "bench --url p50 ms", "serve.py p50 ms"):
        table.add_column(col, justify="right")
    for clients in (1, 16):
        b = got[("bench --url", clients)]
        s = got[("serve.py", clients)]
        br, sr = statistics.median(v[0] for v in b), statistics.median(v[0] for v in s)
        bp, sp = statistics.median(v[1] for v in b), statistics.median(v[1] for v in s)
        table.add_row(str(clients), f"{br:.1f}", f"{sr:.1f}", f"{br / sr:.3f}", f"{bp:.2f}", f"{sp:.2f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="an EfficientNet-Lite0 .luodi (default: compile the zoo's)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per side per target per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        help="engine threads for luodi bench and benchmark_app (default: each engine's own, as engines.py uses)",
    )
    ap.add_argument("--serve", action="store_true", help="also compare luodi bench --url with benchmarks/serve.py")
    ap.add_argument("--serve-only", action="store_true", help="only that comparison")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.serve_only:
        if args.package is None:
            raise SystemExit("--serve-only needs --package")
        serve_check(args.package, args.seconds, args.rounds, console)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.package
        if path is None:
            from luodi.zoo import efficientnet_lite0

            path = Path(tmp) / "effnet.luodi"
            wanted = [b for b in ("onnxruntime", "openvino", "ncnn", "mnn") if luodi.get_backend(b).available().ok]
            luodi.compile(efficientnet_lite0(), path, targets=wanted)
        pkg = luodi.Package(path)
        targets = [
            f"{t['backend']}:{t['precision']}"
            for t in pkg.targets
            if t["precision"] == "fp32" and t["backend"] in RAW and t.get("status") != "failed"
        ]
        onnx_file = Path(tmp) / "model.onnx"
        onnx_file.write_bytes(pkg.model_bytes())
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        got: dict[str, dict[str, list[float]]] = {t: {"bench": [], "raw": []} for t in targets}
        app: list[float] = []
        for r in range(args.rounds):
            sides = ["bench", "raw", "app"] if r % 2 == 0 else ["app", "raw", "bench"]
            for side in sides:
                if side == "bench":
                    plan = Plan(
                        path,
                        targets=targets,
                        threads=args.threads,
                        duration=args.seconds,
                        cold_start=False,
                        overhead=False,
                    )
                    report = bench(plan)
                    for t in report["targets"]:
                        got[t["target"]]["bench"].append(t["results"][0]["p50_ms"])
                elif side == "raw":
                    for t in targets:
                        got[t]["raw"].append(raw_median(t, pkg, x, args.seconds / 2))
                elif "openvino:fp32" in targets:
                    median = benchmark_app(onnx_file, args.threads, args.seconds)
                    if median is not None:
                        app.append(median)
            console.print(f"round {r + 1}/{args.rounds} done", style="dim")
        if args.serve:  # while the package (perhaps a temporary one) is still there
            serve_check(path, args.seconds, args.rounds, console)

    threads = f"{args.threads} threads" if args.threads else "the engines' default threads"
    table = Table(title=f"luodi bench vs the yardsticks, EfficientNet-Lite0 [1,3,224,224], {threads}")
    for col in ("target", "luodi bench p50 ms", "raw API p50 ms", "bench / raw", "benchmark_app ms", "bench / app"):
        table.add_column(col, justify="left" if col == "target" else "right")
    # each cell: the median over the rounds (each round's own median in brackets); the ratio of the medians, then, in
    # brackets, of the quietest rounds (the minima), which a shared machine's bursts of load disturb least
    best = " (quietest {:.3f})"
    verdict = "benchmark_app not found: no OpenVINO comparison"
    for t in targets:
        b = statistics.median(got[t]["bench"])
        raw = statistics.median(got[t]["raw"])
        low = min(got[t]["bench"])
        cells = [
            t,
            f"{b:.2f} ({', '.join(f'{v:.2f}' for v in got[t]['bench'])})",
            f"{raw:.2f} ({', '.join(f'{v:.2f}' for v in got[t]['raw'])})",
            f"{b / raw:.3f}" + best.format(low / min(got[t]["raw"])),
        ]
        if t == "openvino:fp32" and app:
            a = statistics.median(app)
            ratio, quiet = b / a, low / min(app)
            cells += [f"{a:.2f} ({', '.join(f'{v:.2f}' for v in app)})", f"{ratio:.3f}" + best.format(quiet)]
            ok = abs(ratio - 1) <= TOLERANCE
            verdict = (
                f"openvino: luodi bench / benchmark_app = {ratio:.3f} (quietest rounds {quiet:.3f}): "
                f"{'met' if ok else 'NOT met'} (within 10%)"
            )
        else:
            cells += ["", ""]
        table.add_row(*cells)
    console.print(table)
    console.print(verdict)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    console.print(f"host: {os.cpu_count()} cores, load average {load} (other work on the machine adds noise)")


if __name__ == "__main__":
    main()
