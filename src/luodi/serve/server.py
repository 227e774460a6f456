"""Run the model server with uvicorn until SIGTERM/SIGINT, then drain in-flight requests and return (exit 0).

It only wires a ModelRepository, the FastAPI app and uvicorn together; the work is in the other modules.
"""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError
from .batcher import BatchConfig
from .guard import Access, Limits, guarded_http_protocol


def serve(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    batching: BatchConfig | None = None,
    versions: int = 1,
    watch_s: float | None = 2.0,
    session_options: dict[str, Any] | None = None,
    log_level: str = "info",
    limits: Limits | None = None,
    access: Access | None = None,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
) -> None:
    """Serve every package under ``repository`` on ``host:port`` until the process is asked to stop.

    ``limits`` and ``access`` are the request bounds and the API key / read-only mode (luodi.serve.guard);
    with ``ssl_keyfile`` and ``ssl_certfile`` uvicorn speaks TLS itself (else put a TLS proxy in front)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingExtraError("serving needs FastAPI and uvicorn: pip install 'luodi[serve]'") from None
    from .app import create_app
    from .metrics import configure_logging
    from .repository import ModelRepository

    configure_logging(log_level)
    limits = limits or Limits()
    _bound_image_decoding(limits.max_image_pixels)
    repo = ModelRepository(repository, defaults=batching, versions=versions, session_options=session_options)
    app = create_app(repo, watch_s=watch_s, limits=limits, access=access)
    protocol = guarded_http_protocol(limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        log_level=log_level,
        http=protocol or "auto",
        timeout_keep_alive=5,  # uvicorn's default, said aloud: idle keep-alive connections close after 5 s
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
    )
    server = uvicorn.Server(config)
    _tune_gc()
    # uvicorn drains and then re-raises the signal it caught with the handler found before it: make that an
    # orderly exit 0 rather than death by signal.
    previous = {sig: signal.signal(sig, _exit_zero) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bound_image_decoding(max_pixels: int) -> None:
    """Pillow refuses images over twice MAX_IMAGE_PIXELS (and only warns below): make its bound the server's,
    so a decode that slips past the route's header check (an image inside another format) is bounded too."""
    try:
        from PIL import Image
    except ImportError:
        return
    import warnings

    Image.MAX_IMAGE_PIXELS = max_pixels // 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # the limit is the error


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path. Each request allocates a few hundred objects
    (ASGI messages, headers, futures) that reference counting frees; with the default gen-0 threshold of 700 the
    collector ran every few requests and re-scanned the loaded model, framework and engine objects each time (9%
    of the event loop's samples in py-spy at 64 clients). Freezing what exists after start-up takes those out of
    every scan; the higher threshold makes the rare cycles wait longer. EfficientNet-Lite0 at 64 clients: 163 ->
    175 requests/s (benchmarks/serve.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _exit_zero(signum: int, frame: Any) -> None:
    sys.exit(0)
