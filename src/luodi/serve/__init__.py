"""Serving: a KServe v2 HTTP server over a repository of .luodi packages, with dynamic batching and metrics.

protocol, batcher, version and repository need no web framework; app (the routes, which `luodi serve --ray`
serves on Ray Serve too), requests and cli import FastAPI/uvicorn, lazily, so that `import luodi` never pays for
them.
"""

from __future__ import annotations

from .batcher import BatchConfig, Batcher
from .guard import Access, Limits
from .protocol import decode_infer_request, decode_infer_response, encode_infer_request, encode_infer_response
from .repository import ModelRepository, ModelVersion

__all__ = [
    "Access",
    "BatchConfig",
    "Batcher",
    "ModelRepository",
    "Limits",
    "ModelVersion",
    "create_app",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "serve",
]


def create_app(*args, **kwargs):
    """See luodi.serve.app.create_app (imports FastAPI)."""
    from .app import create_app as make

    return make(*args, **kwargs)


def serve(*args, **kwargs):
    """See luodi.serve.server.serve (imports FastAPI and uvicorn)."""
    from .server import serve as run

    return run(*args, **kwargs)
