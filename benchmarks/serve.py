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

``--tiny``: the server's own cost per request, on a model whose engine time is next to nothing (a CNN on
3x32x32 images, about 0.1 ms a run). `luodi serve` (its defaults: dynamic batching up to 32, no queue delay)
against a minimal FastAPI + onnxruntime endpoint written for the comparison (one async route speaking the same
KServe v2 JSON protocol, the engine run on the event loop, uvicorn with the same single worker and no access
log), both subprocesses, driven by the same client with the same JSON request at 1, 16 and 64 clients, the
sides alternating round by round. Printed: requests/s, p50 and p99 of each, the ratios, and the goals (luodi
>= 0.9x the endpoint's requests/s at every concurrency, p50 at one client <= 1.2x) as met or NOT met, with the
per-round ratios' spread.

Run::

    .venv/bin/python benchmarks/serve.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/serve.py --seconds 2 --rounds 1
    .venv/bin/python benchmarks/serve.py --tiny          # about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
import onnx
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
    """`luodi serve -r REPO ARGS` on a free port, or with ``script`` ``python SCRIPT PORT ARGS`` (a baseline)."""

    def __init__(self, repo: Path, *args: str, script: Path | None = None, src: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "luodi", "serve", "-r", str(repo), "--port", str(self.port), "--poll-s", "0"]
        if script is not None:
            cmd = [sys.executable, str(script), str(self.port)]
        # its own session, so that what it starts (Ray's processes with --ray) can be stopped by that id
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={
                **os.environ,
                "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0",
                **({"PYTHONPATH": str(src)} if src is not None else {}),  # another luodi's source, to compare
            },
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

    def cpu_s(self) -> float:
        """CPU seconds the server's threads have run so far (Linux: the scheduler's own count, in ns), or NaN."""
        total = 0
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            return float("nan")
        return total / 1e9

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


def http_request(port: int, body: bytes, header_length: int | None, model: str = "effnet") -> bytes:
    """One infer request as raw HTTP/1.1: binary tensors with ``header_length``, JSON without."""
    kind = "application/octet-stream" if header_length is not None else "application/json"
    binary = f"{HEADER_LENGTH}: {header_length}\r\n" if header_length is not None else ""
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {kind}\r\n{binary}Content-Length: {len(body)}\r\n\r\n"
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
                first = headers.get(HEADER_LENGTH.lower(), "").encode() + b"\n" + content
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


def check_answer(first: bytes, want: np.ndarray, side: str, output: str = "logits") -> None:
    length, _, body = first.partition(b"\n")
    got = decode_infer_response(body, int(length) if length else None)[output]
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
    ap.add_argument("--tiny", action="store_true", help="only luodi serve against a minimal FastAPI endpoint, tiny CNN")
    ap.add_argument(
        "--compare-src",
        type=Path,
        metavar="DIR",
        help="with --tiny: also `luodi serve` from another source tree (e.g. `git archive REV src`'s src), same rounds",
    )
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else (170 if args.tiny else 120))
    if args.tiny:
        tiny_figures(console, args.seconds, args.rounds, args.compare_src)
        return

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


# -- --tiny: the server's own cost per request against a minimal FastAPI + onnxruntime endpoint ----------------

GOAL_RATE, GOAL_P50 = 0.9, 1.2  # luodi / endpoint: requests/s at least, p50 at one client at most

# The endpoint one would write by hand: one route, the same KServe v2 JSON in and out, the engine run on the
# event loop (the cheapest way for a model this small), uvicorn with one worker and no access log.
MINIMAL_ENDPOINT = """
import sys

import numpy as np
import onnx
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
outputs = [o.name for o in session.get_outputs()]
app = FastAPI()


@app.get("/v2/health/ready")
async def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    doc = await request.json()
    feeds = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in doc["inputs"]}
    results = session.run(outputs, feeds)
    return JSONResponse({
        "model_name": name,
        "outputs": [
            {"name": n, "shape": list(r.shape), "datatype": "FP32", "data": r.ravel().tolist()}
            for n, r in zip(outputs, results)
        ],
    })


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, workers=1)
"""


def tiny_cnn() -> onnx.ModelProto:
    """Conv(3->16, 3x3) -> Relu -> Conv(16->16, 3x3, stride 2) -> Relu -> GlobalAveragePool -> Gemm(16->10) on
    [batch, 3, 32, 32]: about 0.1 ms a run, so that what is measured is the server around it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [weight("w1", 16, 3, 3, 3), weight("b1", 16), weight("w2", 16, 16, 3, 3), weight("b2", 16)]
    inits += [weight("fw", 10, 16), weight("fb", 10)]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def json_request(x: np.ndarray) -> bytes:
    """The KServe v2 JSON body both sides get (4 decimals, as a client would send normalised pixels)."""
    data = [round(float(v), 4) for v in x.ravel()]
    doc = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": data}]}
    return json.dumps(doc).encode()


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def tiny_figures(console: Console, seconds: float, rounds: int, other: Path | None = None) -> None:
    """`luodi serve` against MINIMAL_ENDPOINT on the tiny CNN, interleaved round by round, and the goals; with
    ``other`` a luodi source tree, its `luodi serve` too (A/B of a change, in the same rounds)."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        model_path = Path(tmp) / "tiny.onnx"
        onnx.save(tiny_cnn(), model_path)
        pkg = repo / "tiny.luodi"
        luodi.compile(str(model_path), pkg, targets=["onnxruntime"], verify=False)
        script = Path(tmp) / "minimal_endpoint.py"
        script.write_text(MINIMAL_ENDPOINT)
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32).round(4)
        with luodi.Session(pkg, backend="onnxruntime") as s:
            want = s.run({"images": x})["logits"]
        body = json_request(x)
        servers: dict[str, ServerProcess] = {}
        # per (side, clients): every latency, and per round (requests/s, p50) so that the ratios have a spread, and
        # the server's CPU time per request (less at the mercy of the other processes on a shared machine)
        lat: dict[tuple[str, int], list[float]] = {}
        per_round: dict[tuple[str, int], list[tuple[float, float]]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        try:
            servers["luodi serve"] = ServerProcess(repo, "-b", "onnxruntime")
            servers["FastAPI + ORT"] = ServerProcess(repo, str(model_path), script=script)
            if other is not None:
                servers["luodi serve (other)"] = ServerProcess(repo, "-b", "onnxruntime", src=other.resolve())
            for side, srv in servers.items():  # warm-up, and check one answer
                _, _, errors, first = load(srv.port, http_request(srv.port, body, None, "tiny"), 4, 1.0)
                if errors or not first:
                    raise SystemExit(f"{side}: warm-up failed: {errors[:3]}")
                check_answer(first, want, side)
            order = list(servers)
            for clients in CONCURRENCY:
                for r in range(rounds):
                    for side in order[r % len(order) :] + order[: r % len(order)]:
                        port, cpu0 = servers[side].port, servers[side].cpu_s()
                        got, wall, errors, _ = load(port, http_request(port, body, None, "tiny"), clients, seconds)
                        cpu.setdefault((side, clients), []).append((servers[side].cpu_s() - cpu0) / max(len(got), 1))
                        if errors:
                            console.print(f"[yellow]{side}, {clients} clients: {len(errors)} errors, e.g. {errors[0]}")
                        lat.setdefault((side, clients), []).extend(got)
                        p50 = float(np.percentile(got, 50)) * 1000 if got else float("nan")
                        per_round.setdefault((side, clients), []).append((len(got) / wall, p50))
        finally:
            for srv in servers.values():
                srv.stop()

    luodi_side, base_side = order[:2]
    table = Table(title="tiny CNN (3x32x32, onnxruntime fp32), KServe v2 JSON over loopback, the same client")
    for col in ("clients", "luodi req/s", "p50 ms", "p99 ms", "CPU us/req", "FastAPI+ORT req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    table.add_column("CPU us/req", justify="right")
    for col in ("req/s ratio", "(rounds)", "p50 ratio", "(rounds)"):
        table.add_column(col, justify="right")
    verdict = {True: "[green]met[/]", False: "[red]NOT met[/]"}
    goals = []
    for clients in CONCURRENCY:
        row = [str(clients)]
        rates = {}
        p50s = {}
        for side in (luodi_side, base_side):
            ms = np.array(lat[(side, clients)]) * 1000
            rates[side] = float(np.median([r for r, _ in per_round[(side, clients)]]))
            p50s[side] = float(np.percentile(ms, 50))
            row += [f"{rates[side]:.0f}", f"{p50s[side]:.2f}", f"{np.percentile(ms, 99):.2f}"]
            row.append(f"{np.median(cpu[(side, clients)]) * 1e6:.0f}")
        pairs = list(zip(per_round[(luodi_side, clients)], per_round[(base_side, clients)]))
        rate_ratios = [a[0] / b[0] for a, b in pairs]
        p50_ratios = [a[1] / b[1] for a, b in pairs]
        rate_ratio, p50_ratio = float(np.median(rate_ratios)), p50s[luodi_side] / p50s[base_side]
        row += [f"{rate_ratio:.2f}", _spread(rate_ratios), f"{p50_ratio:.2f}", _spread(p50_ratios)]
        table.add_row(*row)
        goals.append((f"requests/s at {clients} client(s)", rate_ratio, rate_ratio >= GOAL_RATE, f">= {GOAL_RATE}"))
        if clients == 1:
            goals.append(("p50 at one client", p50_ratio, p50_ratio <= GOAL_P50, f"<= {GOAL_P50}"))
    console.print(table)
    for what, value, met, goal in goals:
        console.print(f"luodi / FastAPI+ORT, {what}: {value:.2f} (goal {goal}): {verdict[met]}")
    if other is not None:
        _other_table(console, other, lat, per_round, cpu, order)
    console.print(
        f"[dim]req/s: the median of the rounds; p50: over every request of the rounds; ratio spread: the rounds' "
        "lowest-highest; CPU us/req: the server process's CPU time per answered request, median of the rounds. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, onnxruntime {_ort_version()}, {rounds} round(s) x {seconds:g} s per "
        "side and concurrency[/]"
    )


def _other_table(
    console: Console,
    other: Path,
    lat: dict[tuple[str, int], list[float]],
    per_round: dict[tuple[str, int], list[tuple[float, float]]],
    cpu: dict[tuple[str, int], list[float]],
    order: list[str],
) -> None:
    """The other source tree's `luodi serve` against this tree's and the endpoint, round by round."""
    this, base, that = order
    table = Table(title=f"luodi serve from {other} (the same rounds)")
    for col in ("clients", "req/s", "p50 ms", "CPU us/req", "/ FastAPI+ORT req/s", "(rounds)", "this tree / it req/s"):
        table.add_column(col, justify="right")
    for col in ("(rounds)", "p50: this tree / it", "CPU: this tree / it"):
        table.add_column(col, justify="right")
    for clients in CONCURRENCY:
        rounds_that = per_round[(that, clients)]
        vs_base = [a[0] / b[0] for a, b in zip(rounds_that, per_round[(base, clients)])]
        vs_this = [a[0] / b[0] for a, b in zip(per_round[(this, clients)], rounds_that)]
        p50 = {side: float(np.percentile(lat[(side, clients)], 50)) * 1000 for side in (this, that)}
        table.add_row(
            str(clients),
            f"{np.median([r for r, _ in rounds_that]):.0f}",
            f"{p50[that]:.2f}",
            f"{np.median(cpu[(that, clients)]) * 1e6:.0f}",
            f"{np.median(vs_base):.2f}",
            _spread(vs_base),
            f"{np.median(vs_this):.2f}",
            _spread(vs_this),
            f"{p50[this] / p50[that]:.2f}",
            f"{np.median(cpu[(this, clients)]) / np.median(cpu[(that, clients)]):.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
