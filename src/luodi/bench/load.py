"""`luodi bench --url`: a load generator for any KServe v2 (Open Inference Protocol) HTTP server, in the manner of
Triton's perf_analyzer. It reads the model's metadata, builds one request with the binary tensor extension (as
tritonclient sends it: the JSON header, then the raw tensors, ``Inference-Header-Content-Length``), and for each
batch size and concurrency keeps that many keep-alive HTTP/1.1 connections sending back to back for a bounded time:
latency percentiles of the answered requests, requests and samples per second, and the failures by HTTP status.

The clients are one asyncio loop speaking raw HTTP/1.1 in this process (a few microseconds a request), so the client
costs the machine as little as possible; every load is bounded in time and in request count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from .._version import __version__
from ..errors import InputError, ServeError
from ..serve.protocol import HEADER_LENGTH, encode_infer_request, numpy_dtype

URL_SCHEMA_VERSION = "luodi.bench.url/1"
MAX_REQUESTS = 1_000_000
"""A load stops at this many requests, whatever its duration."""
WARMUP_REQUESTS = 2


class Target:
    """A server's address split for raw HTTP: host, port, path prefix, TLS."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--url must be http://HOST:PORT or https://HOST:PORT, got '{url}'")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None


def metadata(target: Target, model: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET /v2/models/{model}: the inputs (name, datatype, shape with -1 for a free dim)."""
    url = f"{target.url}/v2/models/{quote(model, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - the user's own server
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise ServeError(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServeError(f"cannot read the model's metadata at {url}: {getattr(exc, 'reason', exc)}") from None


def build_inputs(meta: dict[str, Any], batch: int, shapes: dict[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
    """Random inputs from the metadata: a free first axis takes ``batch``, another free axis needs ``shapes``."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in meta.get("inputs", []):
        name = spec["name"]
        dtype = numpy_dtype(spec["datatype"])
        if shapes and name in shapes:
            shape = list(shapes[name])
            if shape and spec["shape"] and spec["shape"][0] == -1:
                shape[0] = batch
        else:
            shape = [batch if (i == 0 and d == -1) else d for i, d in enumerate(spec["shape"])]
            if any(d == -1 for d in shape):
                raise InputError(
                    f"input '{name}' has free dimensions {spec['shape']}: give its size with --input-shape "
                    f"{name}=DIMS, e.g. {name}={'x'.join(str(1 if d == -1 else d) for d in spec['shape'])}"
                )
        if dtype.kind == "f":
            feeds[name] = rng.random(shape, dtype=np.float64).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
    if not feeds:
        raise ServeError(f"the model's metadata names no inputs: {json.dumps(meta)[:300]}")
    return feeds


def _request(target: Target, model: str, feeds: dict[str, np.ndarray]) -> bytes:
    body, header_length = encode_infer_request(feeds, binary=True, binary_output=True)
    path = f"{target.prefix}/v2/models/{quote(model, safe='')}/infer"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {header_length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    target: Target, request: bytes, stop_at: float, limit: int, latencies: list[float], errors: Counter[str]
) -> None:
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, ssl=target.tls)
    except OSError as exc:
        errors[f"connect: {exc.strerror or exc}"] += 1
        return
    try:
        while time.perf_counter() < stop_at and len(latencies) + sum(errors.values()) < limit:
            t0 = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            if not status:
                errors["connection closed"] += 1
                return
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                key, _, value = line.decode("latin-1").partition(":")
                key = key.strip().lower()
                if key == "content-length":
                    length = int(value.strip())
                elif key == "connection" and value.strip().lower() == "close":
                    close = True
            await reader.readexactly(length)
            code = status.split()[1].decode() if len(status.split()) > 1 else "?"
            if code == "200":
                latencies.append(time.perf_counter() - t0)
            else:
                errors[code] += 1
            if close:
                return
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors[f"connection: {type(exc).__name__}"] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def load(
    target: Target, request: bytes, clients: int, seconds: float, limit: int
) -> tuple[list[float], float, Counter]:
    """``clients`` connections sending ``request`` back to back for ``seconds`` (at most ``limit`` requests)."""

    async def main() -> tuple[list[float], float, Counter]:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        t0 = time.perf_counter()
        await asyncio.gather(
            *(_client(target, request, t0 + seconds, limit, latencies, errors) for _ in range(clients))
        )
        return latencies, time.perf_counter() - t0, errors

    return asyncio.run(main())


def bench_url(
    url: str,
    model: str,
    batches: list[int],
    concurrency: list[int],
    seconds: float,
    shapes: dict[str, tuple[int, ...]] | None = None,
    requests: int | None = None,
    say: Any = None,
    advance: Any = None,
) -> dict[str, Any]:
    """The load report (docs/bench.md, "--url"): per batch size and concurrency, latency percentiles of the answered
    requests, throughput, and the failures by HTTP status (or connection error)."""
    say = say or (lambda _t: None)
    advance = advance or (lambda _n: None)
    if not model:
        raise InputError("--url needs --model NAME: the model on the server to send requests to")
    target = Target(url)
    meta = metadata(target, model)
    results = []
    for batch in batches:
        feeds = build_inputs(meta, batch, shapes)
        request = _request(target, model, feeds)
        load(target, request, 1, 30.0, WARMUP_REQUESTS)  # connection set-up and the server's first runs
        for clients in concurrency:
            say(f"batch {batch}, {clients} client(s)")
            limit = MAX_REQUESTS if requests is None else requests * clients
            latencies, wall, errors = load(target, request, clients, seconds, limit)
            ms = np.asarray(latencies) * 1e3
            row: dict[str, Any] = {
                "batch": batch,
                "concurrency": clients,
                "requests": int(ms.size),
                "wall_s": wall,
                "errors": dict(sorted(errors.items())),
                "throughput_per_s": ms.size / wall if wall > 0 else 0.0,
                "samples_per_s": ms.size * batch / wall if wall > 0 else 0.0,
            }
            if ms.size:
                p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
                row.update(
                    min_ms=float(ms.min()), p50_ms=p50, p90_ms=p90, p99_ms=p99, max_ms=float(ms.max()),
                    mean_ms=float(ms.mean()),
                )  # fmt: skip
            results.append(row)
            advance(1)
    return {
        "schema": URL_SCHEMA_VERSION,
        "luodi_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": target.url,
        "model": model,
        "inputs": {s["name"]: {"datatype": s["datatype"], "shape": s["shape"]} for s in meta.get("inputs", [])},
        "settings": {"batches": batches, "concurrency": concurrency, "duration_s": seconds, "requests": requests},
        "results": results,
    }
