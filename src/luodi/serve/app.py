"""The FastAPI application: KServe v2 HTTP routes, the pipeline route, the repository API, /metrics and the page.

Routes are thin: decoding is luodi.serve.protocol, queueing luodi.serve.batcher, models luodi.serve.repository.
The engine runs on the batcher's worker threads, except a quick model's lone request (Batcher.run_inline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from .._version import __version__
from ..errors import (
    EngineCrashedError,
    InputError,
    LuodiError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    PipelineError,
    RequestTimeoutError,
)
from . import triton
from .guard import (
    REQUESTS_IN_FLIGHT,
    Access,
    BodyTimeoutError,
    ClientGone,
    Guard,
    Limits,
    PayloadTooLargeError,
    UnauthorizedError,
)
from .metrics import Metrics, request_line
from .protocol import HEADER_LENGTH, decode_infer_request, encode_infer_response, model_metadata
from .repository import ModelRepository
from .requests import INFER_SCHEMA, PREDICT_SCHEMA, decode_huge_json, raw_input, timeout_of

log = logging.getLogger("luodi.serve")

_BIG_JSON = 64 * 1024  # JSON bodies above this are decoded off the event loop
_HUGE_JSON = 4 * 1024 * 1024  # ... and above this one at a time: decoded JSON numbers cost ~9x their text


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error: the client's fault (4xx), busy or unavailable (503), timeout (504), else 500."""
    if isinstance(exc, StarletteHTTPException):  # the framework's own 4xx (a malformed multipart form, ...)
        return exc.status_code
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, BodyTimeoutError):
        return 408
    if isinstance(exc, UnauthorizedError):
        return 401
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, (OverloadedError, ModelUnavailableError, EngineCrashedError)):  # crashed: it restarts
        return 503
    if isinstance(exc, RequestTimeoutError):
        return 504
    if isinstance(exc, (InputError, PipelineError)):
        return 400
    return 500


def error_response(exc: BaseException) -> JSONResponse:
    """The KServe v2 error answer ({"error": reason}) of an exception, with the status status_of gives it."""
    headers: dict[str, str] = {}
    if isinstance(exc, LuodiError):
        message = str(exc)
    elif isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
        headers.update(exc.headers or {})
    else:  # not the user's doing: the traceback is for whoever runs the server, not for the client
        log.error("internal error", exc_info=exc, extra={"event": "internal_error"})
        message = f"internal error ({type(exc).__name__}); the server's log has the details"
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, (PayloadTooLargeError, BodyTimeoutError)):
        headers["Connection"] = "close"  # the rest of the body is not worth reading
    return JSONResponse({"error": message}, status_code=status_of(exc), headers=headers or None)


_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


def _header(scope: dict, name: bytes) -> str | None:
    """The value of request header ``name`` (lower case), or None: what ``Request.headers.get`` gives, without
    building the Headers object."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Any) -> bytes:
    """The whole request body, as ``Request.body()`` reads it (ClientDisconnect if the client hangs up)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if not message.get("more_body", False):
                return b"".join([*chunks, chunk]) if chunks else chunk
            chunks.append(chunk)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class _Answer:
    """An infer route's answer as its two ASGI messages (status, raw headers, body)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @classmethod
    def of(cls, response: Response) -> _Answer:
        return cls(response.status_code, response.raw_headers, bytes(response.body))

    async def send(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})

    def response(self) -> Response:
        """The same answer as a Response, for a FastAPI route."""
        response = Response(self.body, status_code=self.status)
        response.raw_headers = self.headers
        return response


class _InferRoute(Route):
    """A POST route whose endpoint is a plain ASGI callable: Starlette would wrap a function as a Request handler."""

    def __init__(self, path: str, handler: Callable[[dict, Any, Any], Any]) -> None:
        super().__init__(path, _HandlerObject(handler), methods=["POST"], include_in_schema=False)


class _HandlerObject:
    def __init__(self, handler: Callable[[dict, Any, Any], Any]) -> None:
        self._handler = handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._handler(scope, receive, send)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors (a query parameter of the wrong type) as one sentence."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "invalid request: " + "; ".join(parts)


def jsonable(value: Any) -> Any:
    """A pipeline's result (named tuples, dataclasses, arrays) as plain JSON values."""
    import dataclasses

    if hasattr(value, "_asdict"):
        return {k: jsonable(v) for k, v in value._asdict().items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def create_app(
    repository: ModelRepository,
    *,
    watch_s: float | None = None,
    metrics: Metrics | None = None,
    limits: Limits | None = None,
    access: Access | None = None,
    headers: dict[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
) -> FastAPI:
    """The server over ``repository``: its models are loaded at start-up and drained at shutdown.

        ``limits`` bound what one request may cost (body size and read time, image pixels); ``access`` sets the
        API key and whether the model-control routes exist (docs/serving.md, "Security"). ``headers`` go on every
        answer (a Ray Serve replica names its node); ``ready``, a blocking check, must hold too for the server to be
    ready (on Ray: every replica runs). `luodi serve` and `luodi serve --ray` both serve this app.
    """
    limits, access = limits or Limits(), access or Access()
    metrics = metrics or repository.observer or Metrics()
    repository.observer = metrics
    state = {"shutting_down": False, "started": time.time()}
    every_replica = ready  # the route below is named ready
    huge_json = asyncio.Semaphore(1)
    infers = [0]  # /infer requests in the server now (from before their body is read until answered)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(repository.start, watch_s=watch_s)
        log.info("ready", extra={"event": "ready", "models": [m.name for m in repository.models()]})
        yield
        state["shutting_down"] = True
        log.info("shutting down: draining in-flight requests", extra={"event": "shutdown"})
        await run_in_threadpool(repository.close)
        log.info("stopped", extra={"event": "stopped"})

    assets = _docs_assets()
    app = FastAPI(
        title="luodi model server",
        version=__version__,
        description="KServe v2 / Open Inference Protocol over the .luodi packages of a model repository.",
        lifespan=lifespan,
        docs_url=None if assets else "/docs",  # without the assets FastAPI's own pages, which load them from a CDN
        redoc_url=None if assets else "/redoc",
    )
    if assets:
        _offline_docs(app, assets)
    app.state.repository = repository
    app.state.metrics = metrics

    app.add_middleware(Guard, limits=limits, access=access)
    if headers:
        app.add_middleware(_Headers, headers=headers)

    @app.exception_handler(LuodiError)
    async def _luodi_error(request: Request, exc: LuodiError) -> JSONResponse:
        return error_response(exc)

    # Every answer in the KServe error format, the framework's own included (FastAPI says {"detail": ...}).
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=400)

    # -- health and metadata ----------------------------------------------------------------------
    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> JSONResponse:
        """Ready once the start-up scan has tried every package and one model serves (docs/serving.md)."""
        ok = repository.ready() and not state["shutting_down"]
        if ok and every_replica is not None:
            ok = await run_in_threadpool(every_replica)
        return JSONResponse({"ready": ok, **repository.readiness()}, status_code=200 if ok else 503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> dict[str, Any]:
        extensions = ["binary_tensor_data", "model_repository", *triton.EXTENSIONS]
        return {"name": "luodi", "version": __version__, "extensions": extensions}

    # -- Triton's statistics and model-configuration extensions (luodi.serve.triton) -----------------
    # Registered before /v2/models/{name}, which would take "stats" for a model's name.
    def _stats(name: str | None, version: str | None) -> dict[str, Any]:
        versions = [repository.get(name, version)] if version is not None else repository.loaded_versions(name)
        return {"model_stats": [mv.triton_stats() for mv in versions]}

    @app.get("/v2/models/stats", tags=["statistics"])
    async def all_stats() -> dict[str, Any]:
        """Triton's statistics of every loaded model version (tritonclient's get_inference_statistics())."""
        return _stats(None, None)

    @app.get("/v2/models/{name}/stats", tags=["statistics"])
    async def model_stats(name: str) -> dict[str, Any]:
        """Triton's statistics of the model's loaded versions: requests, rows, engine calls, queue and compute
        times, per batch size."""
        return _stats(name, None)

    @app.get("/v2/models/{name}/versions/{version}/stats", tags=["statistics"])
    async def model_version_stats(name: str, version: str) -> dict[str, Any]:
        return _stats(name, version)

    @app.get("/v2/models/{name}/config", tags=["metadata"])
    async def model_config(name: str) -> dict[str, Any]:
        """The newest loaded version's configuration as Triton's model config JSON (tritonclient's
        get_model_config): max_batch_size, inputs and outputs with data_type and dims, dynamic_batching, ..."""
        return triton.model_config(repository.get(name, None), repository.versions)

    @app.get("/v2/models/{name}/versions/{version}/config", tags=["metadata"])
    async def model_version_config(name: str, version: str) -> dict[str, Any]:
        return triton.model_config(repository.get(name, version), repository.versions)

    def _metadata(name: str, version: str | None) -> dict[str, Any]:
        mv = repository.get(name, version)
        versions = [version] if version else sorted(repository.model(name).loaded, key=int)
        return model_metadata(name, versions, mv.platform, mv.session.inputs, mv.session.outputs)

    @app.get("/v2/models/{name}", tags=["metadata"])
    async def model_meta(name: str) -> dict[str, Any]:
        return _metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"])
    async def model_version_meta(name: str, version: str) -> dict[str, Any]:
        return _metadata(name, version)

    async def _ready(name: str, version: str | None) -> JSONResponse:
        try:
            repository.get(name, version)
            ok = not state["shutting_down"]
        except ModelUnavailableError:
            ok = False
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 400)

    @app.get("/v2/models/{name}/ready", tags=["health"])
    async def model_ready(name: str) -> JSONResponse:
        return await _ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["health"])
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        return await _ready(name, version)

    # -- inference ------------------------------------------------------------------------------
    # The infer routes are served by plain ASGI handlers (_InferRoute, ahead of every other route): no Request or
    # Response object, no dependency solving, the answer sent as two ASGI messages. FastAPI's routes below stay for
    # the OpenAPI schema and the docs pages, and would answer the same through _infer if they were reached.
    async def _infer(name: str, version: str | None, scope: dict, body: bytes) -> _Answer:
        t0 = time.perf_counter()
        infers[0] += 1
        try:
            return await _infer_one(name, version, scope, body, t0)
        finally:
            infers[0] -= 1

    async def _infer_one(name: str, version: str | None, scope: dict, body: bytes, t0: float) -> _Answer:
        mv, job = None, None
        try:
            with repository.acquire(name, version) as mv:
                header_length = _header(scope, _HEADER_LENGTH)
                if header_length is None and len(body) > _HUGE_JSON:
                    async with huge_json:
                        req = await run_in_threadpool(decode_huge_json, body)
                elif header_length is None and len(body) > _BIG_JSON:
                    req = await run_in_threadpool(decode_infer_request, body, None)
                else:
                    req = decode_infer_request(body, header_length)
                timeout = timeout_of(req.parameters.get("timeout"), mv.config.timeout_s)
                # The only request in the server runs on the loop when its model is quick: nothing to batch it
                # with, nothing else for the loop to do meanwhile; with others in flight the loop keeps reading and
                # decoding them while a worker thread runs the engine. Under `luodi serve` the HTTP protocol says
                # how many requests are in (their headers read); elsewhere one turn of the loop lets requests that
                # arrived meanwhile start before this one counts them.
                inline = infers[0] == 1 and mv.batcher.inline_ok(req.inputs)
                if inline:
                    in_flight = scope.get("extensions", {}).get(REQUESTS_IN_FLIGHT)
                    if in_flight is not None:
                        inline = len(in_flight) == 1
                    else:
                        await asyncio.sleep(0)
                        inline = infers[0] == 1
                job = mv.submit(req.inputs, timeout, inline=inline)
                if job.future.done():
                    outputs = job.future.result()
                else:
                    try:
                        outputs = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
                    except asyncio.TimeoutError:
                        msg = f"no answer within the request's timeout of {timeout:.3f} s"
                        raise RequestTimeoutError(msg) from None
                data, json_length = encode_infer_response(name, mv.version, outputs, req)
        except Exception as exc:
            if mv is not None:
                mv.observe(False, time.perf_counter() - t0, job, type(exc).__name__)
            _log_request(name, mv.version if mv else version, status_of(exc), t0, job, str(exc))
            return _Answer.of(error_response(exc))
        mv.observe(True, time.perf_counter() - t0, job)
        _log_request(name, mv.version, 200, t0, job)
        # luodi-batch-requests: how many requests shared this one's engine call
        headers = [(b"content-length", b"%d" % len(data)), (b"luodi-batch-requests", b"%d" % job.requests)]
        if json_length is None:
            headers.append((b"content-type", b"application/json"))
        else:
            headers += [(b"content-type", b"application/octet-stream"), (_HEADER_LENGTH, b"%d" % json_length)]
        return _Answer(200, headers, data)

    async def infer_asgi(scope: dict, receive: Any, send: Any) -> None:
        params = scope["path_params"]
        answer = await _infer(params["name"], params.get("version"), scope, await _read_body(receive))
        await answer.send(send)

    @app.post("/v2/models/{name}/infer", tags=["inference"], openapi_extra=INFER_SCHEMA)
    async def infer(name: str, request: Request) -> Response:
        return (await _infer(name, None, request.scope, await request.body())).response()

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["inference"], openapi_extra=INFER_SCHEMA)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return (await _infer(name, version, request.scope, await request.body())).response()

    async def _predict(name: str, version: str | None, request: Request, k: int | None) -> Response:
        t0 = time.perf_counter()
        mv, job = None, None
        try:
            if k is not None and k < 1:
                raise InputError(f"k must be a positive number of classes, got {k}")
            raw = await raw_input(request, limits.max_image_pixels)
            with repository.acquire(name, version) as mv:
                options = {} if k is None else {"k": k}
                result, job = await run_in_threadpool(mv.predict, raw, None, **options)
        except ClientGone:
            raise
        except Exception as exc:
            if mv is not None:
                mv.observe(False, time.perf_counter() - t0, None, type(exc).__name__)
            _log_request(name, mv.version if mv else version, status_of(exc), t0, None, str(exc), route="predict")
            return error_response(exc)
        mv.observe(True, time.perf_counter() - t0, job)
        _log_request(name, mv.version, 200, t0, job, route="predict")
        return JSONResponse({"model_name": name, "model_version": mv.version, "result": jsonable(result)})

    @app.post("/v2/models/{name}/predict", tags=["inference"], openapi_extra=PREDICT_SCHEMA)
    async def predict(name: str, request: Request, k: int | None = None) -> Response:
        """Run the package's pre/post-processing pipeline on a raw input (e.g. an uploaded image)."""
        return await _predict(name, None, request, k)

    @app.post("/v2/models/{name}/versions/{version}/predict", tags=["inference"], openapi_extra=PREDICT_SCHEMA)
    async def predict_version(name: str, version: str, request: Request, k: int | None = None) -> Response:
        return await _predict(name, version, request, k)

    # -- repository API (model control): absent in read-only mode, behind the key when there is one -----
    if not access.read_only:

        @app.post("/v2/repository/index", tags=["repository"])
        async def repository_index() -> list[dict[str, Any]]:
            return repository.index()

        @app.post("/v2/repository/models/{name}/load", tags=["repository"])
        async def repository_load(name: str) -> dict[str, Any]:
            await run_in_threadpool(repository.load, name)
            return {}

        @app.post("/v2/repository/models/{name}/unload", tags=["repository"])
        async def repository_unload(name: str) -> dict[str, Any]:
            await run_in_threadpool(repository.unload, name)
            return {}

    # -- observability and the page -------------------------------------------------------------
    @app.get("/metrics", tags=["observability"])
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/luodi/models", tags=["observability"])
    async def status() -> dict[str, Any]:
        """Every model, its versions, their state and live figures (what the web page shows)."""
        return {
            "server": {"version": __version__, "uptime_s": time.time() - state["started"]},
            "models": repository.status(),
        }

    page = resources.files("luodi.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    # The router tries the routes in order and nearly every request is an infer: its plain ASGI routes first (no
    # other route's path ends in /infer, so none is shadowed but FastAPI's own infer routes, kept for the schema).
    infer_paths = [r.path for r in app.router.routes if getattr(r, "path", "").endswith("/infer")]
    app.router.routes[:0] = [_InferRoute(path, infer_asgi) for path in infer_paths]
    return app


_DOCS_ASSETS = "/luodi/docs-assets"
# The docs pages fetch nothing but this server: ReDoc's side menu would load Redocly's logo from its CDN (a request
# to a third party from every reader's browser); with this policy the browser does not send it.
_DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


def _docs_assets() -> str | None:
    """The folder of swagger-ui's and ReDoc's JavaScript and CSS that the fastapi-offline package ships (luodi[serve]
    installs it), or None when it is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    needed = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
    return str(folder) if all((folder / name).is_file() for name in needed) else None


def _offline_docs(app: FastAPI, folder: str) -> None:
    """/docs (swagger-ui) and /redoc with their assets served by this server, so that they render with no network
    (FastAPI's own pages load them, the favicon and fonts from CDNs, and render blank offline)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.staticfiles import StaticFiles

    app.mount(_DOCS_ASSETS, StaticFiles(directory=folder), name="docs-assets")
    redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect}",
            swagger_js_url=f"{root}{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io's online validator
        )
        page.headers["Content-Security-Policy"] = _DOCS_CSP
        return page

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{_DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{_DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = _DOCS_CSP
        return page


class _Headers:
    """ASGI middleware: fixed headers on every HTTP answer."""

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def add(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, add)


def _log_request(
    model: str, version: str | None, status: int, t0: float, job: Any, error: str = "", route: str = "infer"
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    extra: dict[str, Any] = {
        "event": route,
        "model": model,
        "version": version,
        "status": status,
        "total_ms": round(1000 * (time.perf_counter() - t0), 3),
    }
    if job is not None and job.batch_size:
        extra.update(
            batch=job.batch_size, queue_ms=round(1000 * job.queue_s, 3), compute_ms=round(1000 * job.compute_s, 3)
        )
        if job.inline:
            extra["inline"] = True
    if error:
        extra["error"] = error
    request_line(log, logging.WARNING if status >= 500 else logging.INFO, route, extra)
