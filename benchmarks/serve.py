"""`luodi serve` on EfficientNet-Lite0 over loopback: dynamic batching vs none, and the server vs an in-process Session.

What it measures
----------------
Two `luodi serve` subprocesses on 127.0.0.1 serve the same EfficientNet-Lite0 package (onnxruntime fp32):
one with dynamic batching (``--max-batch-size 32``, the default 0 ms queue delay), one without
(``--max-batch-size 1``). For 1, 16 and 64 concurrent clients, each client keeps one HTTP/1.1 keep-alive
connection and sends KServe v2 binary-tensor infer requests (one image, [1,3,224,224] float32) back to
back. Reported per side: throughput (answered requests per second), p50 and p99 latency, and the mean
batch the server ran (from its /metrics). Then the in-process baseline: ``Session.run`` on a batch of
the size the batched server ran at 64 clients, as images per second, over the same time.

Targets: batching >= 2x the throughput of no batching at 64 clients; the batched server's throughput
at 64 clients >= 0.8 of the in-process Session's at the same batch size.

Then the same load against ``luodi serve --ray`` on one node (Ray Serve, one replica running the same
app and luodi's batcher with the same batch size and delay, ``max_ongoing_requests`` 64): its throughput,
latency, mean batch (from the ``luodi-batch-requests`` header of each answer: requests / sum(1 / batch))
and its throughput as a fraction of the in-process Session's at that batch size, timed after each round
while Ray idles. ``--no-ray`` leaves it out, ``--ray-only`` runs only it.

How
---
The clients are one asyncio loop in this process speaking raw HTTP/1.1 (a few microseconds a request),
so that the client costs the shared CPU as little as possible; the servers are real subprocesses. The
sides alternate round by round (order rotated) so that noise on a shared machine hits both. Every load
is bounded in time (``--seconds`` per round) and in count. The first answer of each side is checked
against ``Session.run`` on the same image. The script reports, it does not assert.

Run::

    .venv/bin/python benchmarks/serve.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/serve.py --seconds 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

import luodi
from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

CONCURRENCY = (1, 16, 64)
BATCH_TARGET = 2.0
FRACTION_TARGET = 0.8
MAX_REQUESTS = 200_000  # per load, whatever --seconds says


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, repo: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "luodi", "serve", "-r", str(repo), "--port", str(self.port), "--poll-s", "0"]
        # its own session, so that what it starts (Ray's processes with --ray) can be stopped by that id
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"},
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise SystemExit("the server was not ready within 180 s")

    def batches(self) -> tuple[float, float]:
        """(items, batches) the server has run so far, from /metrics."""
        items = count = 0.0
        for line in httpx.get(f"{self.base}/metrics").text.splitlines():
            if line.startswith("luodi_batch_size_sum{"):
                items += float(line.split()[-1])
            elif line.startswith("luodi_batch_size_count{"):
                count += float(line.split()[-1])
        return items, count

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def http_request(port: int, body: bytes, header_length: int) -> bytes:
    head = (
        f"POST /v2/models/effnet/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {header_length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[str], joined: list[int]
) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first = b""
    try:
        while time.perf_counter() < stop_at and len(latencies) < MAX_REQUESTS:
            t0 = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            content = await reader.readexactly(int(headers.get("content-length", 0)))
            code = int(status.split()[1])
            if code != 200:
                errors.append(f"{code}: {content[:200]!r}")
                continue
            latencies.append(time.perf_counter() - t0)
            if "luodi-batch-requests" in headers:  # Ray Serve: how many requests shared this one's engine call
                joined.append(int(headers["luodi-batch-requests"]))
            if not first:
                first = headers[HEADER_LENGTH.lower()].encode() + b"\n" + content
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return first


def load(
    port: int, request: bytes, clients: int, seconds: float, joined: list[int] | None = None
) -> tuple[list[float], float, list[str], bytes]:
    """``clients`` connections sending back to back for ``seconds``: latencies, wall time, errors, one answer."""

    async def main() -> tuple[list[float], float, list[str], bytes]:
        latencies: list[float] = []
        errors: list[str] = []
        sizes = joined if joined is not None else []
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        firsts = await asyncio.gather(
            *(_client(port, request, stop_at, latencies, errors, sizes) for _ in range(clients))
        )
        return latencies, time.perf_counter() - t0, errors, next((f for f in firsts if f), b"")

    return asyncio.run(main())


def check_answer(first: bytes, want: np.ndarray, side: str) -> None:
    length, _, body = first.partition(b"\n")
    got = decode_infer_response(body, int(length))["logits"]
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"{side}: the server's logits differ from Session.run's (max {np.abs(got - want).max()})")


def session_throughput(session: luodi.Session, batch: int, seconds: float) -> float:
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    session.run({"images": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < MAX_REQUESTS:
        session.run({"images": x})
        n += 1
    return n * batch / (time.perf_counter() - t0)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each load, per side per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (sides alternate)")
    ap.add_argument("--package", type=Path, help="an EfficientNet-Lite0 .luodi to serve (default: compile the zoo's)")
    ap.add_argument("--no-ray", action="store_true", help="leave out the `luodi serve --ray` figures")
    ap.add_argument("--ray-only", action="store_true", help="only the `luodi serve --ray` figures")
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
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        with luodi.Session(pkg, backend="onnxruntime") as s:
            want = s.run({"images": x})["logits"]
        body, n = encode_infer_request({"images": x})
        if args.ray_only:
            ray_figures(console, repo, pkg, body, n, want, args.seconds, args.rounds)
            return
        sides = {
            "batching": ("--max-batch-size", "32"),
            "no batching": ("--max-batch-size", "1"),
        }
        servers = {}
        try:
            for side, flags in sides.items():
                servers[side] = ServerProcess(repo, "-b", "onnxruntime", *flags)
            results: dict[tuple[str, int], dict[str, list]] = {}
            for side, srv in servers.items():  # warm-up, and check one answer
                _, _, errors, first = load(srv.port, http_request(srv.port, body, n), 4, 1.0)
                if errors or not first:
                    raise SystemExit(f"{side}: warm-up failed: {errors[:3]}")
                check_answer(first, want, side)
            order = list(servers)
            for clients in CONCURRENCY:
                for r in range(args.rounds):
                    for side in order[r % 2 :] + order[: r % 2]:
                        srv = servers[side]
                        items0, batches0 = srv.batches()
                        lat, wall, errors, _ = load(srv.port, http_request(srv.port, body, n), clients, args.seconds)
                        items1, batches1 = srv.batches()
                        acc = results.setdefault((side, clients), {"lat": [], "wall": [], "items": [], "batches": []})
                        acc["lat"] += lat
                        acc["wall"].append(wall)
                        acc["items"].append(items1 - items0)
                        acc["batches"].append(batches1 - batches0)
                        if errors:
                            console.print(f"[yellow]{side}, {clients} clients: {len(errors)} errors, e.g. {errors[0]}")
        finally:
            for srv in servers.values():
                srv.stop()

        def figures(side: str, clients: int) -> tuple[float, float, float, float]:
            acc = results[(side, clients)]
            lat = np.array(acc["lat"]) * 1000
            rate = len(lat) / sum(acc["wall"])
            mean_batch = sum(acc["items"]) / max(sum(acc["batches"]), 1)
            return rate, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), mean_batch

        table = Table(
            title="luodi serve, EfficientNet-Lite0 (onnxruntime fp32), KServe v2 binary tensors over loopback"
        )
        for col in (
            "clients",
            "batching req/s",
            "p50 ms",
            "p99 ms",
            "mean batch",
            "none req/s",
            "p50 ms",
            "p99 ms",
            "speed-up",
        ):
            table.add_column(col, justify="right")
        for clients in CONCURRENCY:
            b, u = figures("batching", clients), figures("no batching", clients)
            table.add_row(
                str(clients),
                f"{b[0]:.1f}",
                f"{b[1]:.1f}",
                f"{b[2]:.1f}",
                f"{b[3]:.1f}",
                f"{u[0]:.1f}",
                f"{u[1]:.1f}",
                f"{u[2]:.1f}",
                f"x{b[0] / u[0]:.2f}",
            )
        console.print(table)
        b64, u64 = figures("batching", 64), figures("no batching", 64)
        batch = max(1, round(b64[3]))
        with luodi.Session(pkg, backend="onnxruntime") as s:
            local = session_throughput(s, batch, args.seconds * args.rounds)
        speedup, fraction = b64[0] / u64[0], b64[0] / local
        console.print(
            f"in-process Session.run at batch {batch}: {local:.1f} images/s; the batching server at 64 clients: "
            f"{b64[0]:.1f} images/s = {fraction:.2f} of it"
        )
        verdict = {True: "[green]met[/]", False: "[red]NOT met[/]"}
        console.print(
            f"batching vs none at 64 clients: x{speedup:.2f} (target >= x{BATCH_TARGET}): "
            f"{verdict[speedup >= BATCH_TARGET]}"
        )
        console.print(
            f"server / in-process at the same batch: {fraction:.2f} (target >= {FRACTION_TARGET}): "
            f"{verdict[fraction >= FRACTION_TARGET]}"
        )
        if not args.no_ray:
            ray_figures(console, repo, pkg, body, n, want, args.seconds, args.rounds)
        console.print(
            f"[dim]{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, onnxruntime {_ort_version()}, "
            f"{args.rounds} round(s) x {args.seconds:g} s per side and concurrency[/]"
        )


def ray_figures(
    console: Console, repo: Path, pkg: Path, body: bytes, n: int, want: np.ndarray, seconds: float, rounds: int
) -> None:
    """`luodi serve --ray` on one node under the same load, and its fraction of Session.run at its mean batch."""
    flags = ("--ray", "-b", "onnxruntime", "--max-batch-size", "32")
    flags += ("--max-ongoing-requests", "64", "--num-cpus", "1")
    console.print("[dim]starting `luodi serve --ray` (one node) ...[/]")
    srv = ServerProcess(repo, *flags)
    rows = []
    # Session.run is timed between Ray's rounds, while Ray idles (its proxy and controller still run), so that
    # both sides of each fraction see the same load from the rest of the machine.
    session = luodi.Session(pkg, backend="onnxruntime")
    try:
        _, _, errors, first = load(srv.port, http_request(srv.port, body, n), 4, 2.0)
        if errors or not first:
            raise SystemExit(f"ray: warm-up failed: {errors[:3]}")
        check_answer(first, want, "ray")
        for clients in CONCURRENCY:
            lat: list[float] = []
            joined: list[int] = []
            wall, local = 0.0, []
            for _ in range(rounds):
                got, w, errors, _ = load(srv.port, http_request(srv.port, body, n), clients, seconds, joined)
                lat += got
                wall += w
                if errors:
                    console.print(f"[yellow]ray, {clients} clients: {len(errors)} errors, e.g. {errors[0]}")
                mean_batch = len(joined) / sum(1 / j for j in joined) if joined else 1.0
                local.append(session_throughput(session, max(1, round(mean_batch)), seconds))
            ms = np.array(lat) * 1000
            rate = len(lat) / wall
            rows.append((clients, rate, np.percentile(ms, 50), np.percentile(ms, 99), mean_batch, np.mean(local)))
    finally:
        srv.stop()
        session.close()
    table = Table(title="luodi serve --ray (Ray Serve, one node, one replica, luodi's batcher 32, no wait)")
    for col in ("clients", "req/s", "p50 ms", "p99 ms", "mean batch", "Session at that batch", "fraction"):
        table.add_column(col, justify="right")
    for clients, rate, p50, p99, mean_batch, local in rows:
        table.add_row(
            str(clients),
            f"{rate:.1f}",
            f"{p50:.1f}",
            f"{p99:.1f}",
            f"{mean_batch:.1f}",
            f"{local:.1f}",
            f"{rate / local:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
