"""Scale-out on Ray: a model repository as Ray Serve deployments, and batch inference over a folder with Ray Data.

Decoding is luodi.serve.protocol and model discovery luodi.serve.repository; this module only adapts them to Ray.
It imports ray lazily (`import luodi` must not), and never starts or stops a Ray cluster it did not start itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MissingExtraError, ModelNotFoundError
from .batcher import BatchConfig, Feeds

HEALTH_PREFIX = "/v2/health"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _ray() -> Any:
    # Ray 2.5x refuses to start without an explicit auth mode; a loopback cluster of one user needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise MissingExtraError("scale-out on Ray needs Ray Serve and Ray Data: pip install 'luodi[ray]'") from None
    return ray


def _runtime_env() -> dict[str, Any]:
    # Ray's workers import luodi from where this process did (e.g. a source checkout on PYTHONPATH).
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else {}


@dataclass(frozen=True)
class Scaling:
    """How many replicas of each model, and what each may take on. Plain data, turned into Ray Serve options.

    ``replicas`` is a fixed count; ``autoscale`` = (min, max) lets Ray Serve add replicas while each holds more
    than ``target_ongoing_requests`` requests (default: the batch size). ``max_ongoing_requests`` must be at
    least the batch size, or no batch ever fills (Ray's default of 5 collapses throughput); the default is
    twice the batch size, so that a full batch waits while one computes.
    """

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float = 0.5
    resources: dict[str, float] | None = None

    def options(self, batching: BatchConfig) -> dict[str, Any]:
        """The keyword arguments of ``Deployment.options`` for a model batching as ``batching`` says."""
        batch = max(batching.max_batch_size, 1)
        ongoing = self.max_ongoing_requests or max(2 * batch, 8)
        bad = []
        if ongoing < batch:
            bad.append(f"max_ongoing_requests {ongoing} < max_batch_size {batch}: batches could never fill")
        if self.replicas < 1:
            bad.append(f"replicas {self.replicas} < 1")
        if self.autoscale and not 0 <= self.autoscale[0] <= self.autoscale[1] or self.autoscale == (0, 0):
            bad.append(f"autoscale {self.autoscale} must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        if self.num_cpus < 0:
            bad.append(f"num_cpus {self.num_cpus} < 0")
        if bad:
            raise InputError("invalid Ray Serve settings: " + "; ".join(bad))
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        opts: dict[str, Any] = {"max_ongoing_requests": ongoing, "ray_actor_options": actor}
        if self.autoscale:
            opts["autoscaling_config"] = {
                "min_replicas": self.autoscale[0],
                "max_replicas": self.autoscale[1],
                "target_ongoing_requests": self.target_ongoing_requests or batch,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


# -- Ray Serve --------------------------------------------------------------------------------------------
@functools.cache
def _deployments() -> tuple[Any, Any]:
    """The two deployment classes, built on first use so that Ray is imported only then."""
    ray = _ray()
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from .app import _raw_input, error_response, jsonable
    from .guard import Limits, PayloadTooLargeError, _too_large

    limits = Limits()  # the body is read whole by Ray's proxy first: checked after, not while it streams

    async def read_body(request: Request) -> bytes:
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise PayloadTooLargeError(_too_large(len(body), limits.max_body_bytes))
        return body

    from .protocol import HEADER_LENGTH, decode_infer_request, encode_infer_response, model_metadata
    from .repository import _batchable, check_feeds

    @serve.deployment(name="luodi-model")
    class ModelReplica:
        """One replica of one model version: a Session, and `@serve.batch` joining requests along the batch dim."""

        def __init__(self, name: str, version: str, path: str, options: dict[str, Any], batching: dict) -> None:
            from ..session import Session

            self.name, self.version = name, version
            self.session = Session(path, **options)
            self.session.prepare()
            self.batchable = _batchable(self.session)
            here = ray.get_runtime_context().get_node_id()
            self.node = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here), "")
            self._infer.set_max_batch_size(max(batching["max_batch_size"], 1) if self.batchable else 1)
            self._infer.set_batch_wait_timeout_s(batching["max_queue_delay_ms"] / 1000)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def _infer(self, requests: list[Feeds]) -> list[tuple[Feeds | None, BaseException | None, int]]:
            # Requests join only where every input agrees in trailing shape and dtype (as the HTTP server's batcher).
            groups: dict[Any, list[int]] = {}
            for i, feeds in enumerate(requests):
                key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feeds.items())) if self.batchable else i
                groups.setdefault(key, []).append(i)
            answers: list[Any] = [None] * len(requests)
            for members in groups.values():
                parts = [requests[i] for i in members]
                feeds = parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
                try:
                    outputs = await asyncio.to_thread(self.session.run, feeds)
                except Exception as exc:  # the engine's failure goes to every request of the batch
                    for i in members:
                        answers[i] = (None, exc, len(members))
                    continue
                offset = 0
                for i, part in zip(members, parts, strict=True):
                    size = next(iter(part.values())).shape[0]
                    answers[i] = ({n: v[offset : offset + size] for n, v in outputs.items()}, None, len(members))
                    offset += size
            return answers

        async def __call__(self, request: Request) -> Response:
            route = request.url.path.rstrip("/").split(f"/v2/models/{self.name}", 1)[-1].strip("/")
            parts = route.split("/") if route else []
            if len(parts) >= 2 and parts[0] == "versions":
                if parts[1] != self.version:
                    return error_response(
                        ModelNotFoundError(f"model '{self.name}' serves version {self.version} here, not {parts[1]}")
                    )
                parts = parts[2:]
            verb = parts[0] if parts else ""
            headers = {"luodi-node": self.node}
            try:
                if request.method == "GET" and verb == "":
                    meta = model_metadata(
                        self.name,
                        [self.version],
                        f"luodi_{self.session.backend}",
                        self.session.inputs,
                        self.session.outputs,
                    )
                    return JSONResponse(meta, headers=headers)
                if request.method == "GET" and verb == "ready":
                    return Response(status_code=200, headers=headers)
                if request.method == "POST" and verb == "infer":
                    body = await read_body(request)
                    req = decode_infer_request(body, request.headers.get(HEADER_LENGTH))
                    check_feeds(self.session, self.name, req.inputs)
                    outputs, exc, joined = await self._infer(req.inputs)
                    if exc is not None:
                        raise exc
                    headers["luodi-batch-requests"] = str(joined)  # how many requests shared the engine call
                    data, n = encode_infer_response(self.name, self.version, outputs, req)
                    if n is None:
                        return Response(data, media_type="application/json", headers=headers)
                    return Response(
                        data, media_type="application/octet-stream", headers={**headers, HEADER_LENGTH: str(n)}
                    )
                if request.method == "POST" and verb == "predict":
                    await read_body(request)  # cached by starlette for _raw_input
                    raw = await _raw_input(request, limits.max_image_pixels)
                    k = request.query_params.get("k")
                    if k is not None and not (k.isdigit() and int(k) >= 1):
                        raise InputError(f"k must be a positive number of classes, got {k[:20]!r}")
                    options = {} if k is None else {"k": int(k)}
                    result = await asyncio.to_thread(self.session.predict, raw, **options)
                    doc = {"model_name": self.name, "model_version": self.version, "result": jsonable(result)}
                    return JSONResponse(doc, headers=headers)
            except Exception as exc:
                return error_response(exc)
            return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)

    @serve.deployment(name="luodi-health", num_replicas=1, ray_actor_options={"num_cpus": 0})
    class Health:
        """/v2/health/live and /ready: deployed last, so it answers only once every model is running."""

        async def __call__(self, request: Request) -> Response:
            return Response(status_code=200)

    return ModelReplica, Health


@dataclass
class RayServer:
    """What `serve_on_ray` deployed: the models (name -> version) and the HTTP address of Ray Serve's proxy."""

    models: dict[str, str]
    url: str
    started_ray: bool = False

    def shutdown(self) -> None:
        """Delete these deployments; a Ray this process started is stopped, a cluster it joined keeps running."""
        ray = _ray()
        from ray import serve

        if self.started_ray:
            serve.shutdown()
        else:  # other applications may share the cluster's Serve: remove only ours
            for name in [*self.models, "luodi-health"]:
                # the controller finishes the deletion; waiting here can take a minute when a node has died
                serve.delete(name, _blocking=False)
        ray.shutdown()


def deploy(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    batching: BatchConfig | None = None,
    scaling: Scaling | None = None,
    session_options: dict[str, Any] | None = None,
    address: str = "local",
    node_ip: str | None = None,
    on_ray_started: Callable[[], None] | None = None,
) -> RayServer:
    """Join (or, with address "local", start) Ray and deploy the newest version of every model under ``repository``.

    Each model is one Ray Serve application at /v2/models/NAME (KServe v2 infer, metadata, ready, and the
    pipeline's predict), with ``scaling``'s replicas; NAME/config.json sets that model's batching as for
    `luodi serve`. Returns once every replica is running.
    """
    from .repository import ModelRepository

    repo = ModelRepository(repository, defaults=batching)
    found = repo.scan()
    if not found:
        raise ModelNotFoundError(f"no .luodi package in {repo.root}; put NAME.luodi or NAME/1/*.luodi there")
    scaling = scaling or Scaling()
    configs = {name: repo._config(name) for name in found}
    plans = {name: scaling.options(configs[name]) for name in found}  # bad settings fail before Ray starts
    ray = _ray()
    from ray import serve

    started = not ray.is_initialized() and address == "local"
    if not ray.is_initialized():
        ip = node_ip or (host if host.startswith("127.") else "127.0.0.1")
        ray.init(
            address=address,
            **({"include_dashboard": False} if address == "local" else {}),
            _node_ip_address=ip,
            log_to_driver=False,
            runtime_env=_runtime_env(),
        )
    if on_ray_started is not None:
        on_ray_started()
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    replica, health = _deployments()
    models = {}
    for name, versions in found.items():
        version = max(versions, key=int)
        cfg = configs[name]
        app = replica.options(name=f"luodi-{name}", **plans[name]).bind(
            name,
            version,
            str(versions[version].path.resolve()),
            dict(session_options or {}),
            {"max_batch_size": cfg.max_batch_size, "max_queue_delay_ms": cfg.max_queue_delay_ms},
        )
        serve.run(app, name=name, route_prefix=f"/v2/models/{name}")
        models[name] = version
    serve.run(health.bind(), name="luodi-health", route_prefix=HEALTH_PREFIX)
    return RayServer(models, f"http://{host}:{port}", started)


def serve_on_ray(repository: str | Path, **kwargs: Any) -> None:
    """`luodi serve --ray`: deploy, then wait until SIGTERM/SIGINT and tear the deployments down (exit 0)."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def catch() -> None:  # before deploying, and again once Ray is up: ray.init installs its own SIGTERM handler
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())

    catch()
    server = None
    try:
        # A SIGTERM that arrives while deploying (the health route answers before deploy returns) is kept in
        # `stop`: the deployments are then torn down at once and the command still exits 0.
        server = deploy(repository, on_ray_started=catch, **kwargs)
        print(f"luodi on Ray Serve: {server.url} models {server.models}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()


# -- Ray Data -----------------------------------------------------------------------------------------------
class _Predictor:
    """A Ray Data actor: one Session per actor, the package's pipeline on each file of a batch."""

    def __init__(self, package: str, options: dict[str, Any], predict_options: dict[str, Any]) -> None:
        from ..session import Session

        self.session = Session(package, **options)
        self.predict_options = predict_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .app import jsonable

        results, errors = [], []
        for data in batch["bytes"]:
            try:
                result = self.session.predict(bytes(data), **self.predict_options)
                results.append(json.dumps(jsonable(result)))
                errors.append("")
            except Exception as exc:  # one unreadable file must not lose the others' results
                results.append("null")
                errors.append(f"{type(exc).__name__}: {exc}")
        return {
            "path": batch["path"],
            "result": np.array(results, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def input_files(input_dir: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``input_dir`` (not recursive) whose suffix is one of ``suffixes``, sorted."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory; pass a folder of input files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"{folder} holds no file ending in {', '.join(suffixes)}")
    return files


def batch_predict(
    package: str | Path,
    input_dir: str | Path,
    output: str | Path,
    *,
    actors: int = 1,
    batch_size: int = 8,
    num_cpus: float = 1.0,
    session_options: dict[str, Any] | None = None,
    predict_options: dict[str, Any] | None = None,
    address: str = "local",
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> int:
    """Run ``package``'s pipeline on every file of ``input_dir`` with Ray Data; write one JSON line per file.

    Each line is {"file", "result", "error"} in file-name order; a file the pipeline cannot read gets its
    error and a null result. ``actors`` Ray actors each hold one Session. Returns how many files failed.
    """
    from ..package import Package

    files = input_files(input_dir, suffixes)
    if not Package(package).pipeline:
        from ..errors import PipelineError

        raise PipelineError(f"{package} has no pre/post-processing pipeline; `luodi batch` needs a package with one")
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            **({"include_dashboard": False} if address == "local" else {}),
            _node_ip_address="127.0.0.1" if address == "local" else None,
            log_to_driver=False,
            runtime_env=_runtime_env(),
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True)
        ds = ds.map_batches(
            _Predictor,
            fn_constructor_args=(
                str(Path(package).resolve()),
                dict(session_options or {}),
                dict(predict_options or {}),
            ),
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=num_cpus,
        )
        rows = {str(Path(r["path"]).name): r for r in ds.iter_rows()}
    finally:
        if started:
            ray.shutdown()
    failed = 0
    tmp = Path(output).with_name(Path(output).name + ".part")
    with open(tmp, "w") as f:
        for path in files:
            row = rows.get(path.name)
            error = "no result came back" if row is None else row["error"]
            result = None if row is None or error else json.loads(row["result"])
            failed += bool(error)
            f.write(json.dumps({"file": path.name, "result": result, "error": error or None}) + "\n")
    tmp.replace(output)
    return failed
