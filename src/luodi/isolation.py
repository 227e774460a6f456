"""An Engine whose model is loaded and run by its backend in a worker process: Session(isolate=...).

Above the backends (it loads any of them in the child); the worker process itself (luodi.worker) sits below them,
so that a backend may drive a vendor toolchain through it.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

from .backends.base import Engine
from .worker.process import Worker
from .worker.wire import Arrays


def isolated_engine(artifact: Any, options: Any, isolate: bool | int | str) -> Engine:
    """The Engine for Session(isolate=...): True, an int (how many runs in flight), or "auto" (crash-prone only)."""
    from .backends import get_backend
    from .errors import InputError

    if isolate == "auto":
        if not getattr(get_backend(artifact.backend), "crash_prone", False):
            from . import backends

            return backends.load_engine(artifact, options)
        isolate = True
    if isolate is True:
        return WorkerEngine(artifact, options)
    if isinstance(isolate, bool) or not isinstance(isolate, int) or isolate < 1:
        raise InputError(f"isolate must be True, False, 'auto' or a number of runs in flight >= 1, got {isolate!r}")
    return WorkerEngine(artifact, options, slots=isolate)


class WorkerEngine(Engine):
    """An Engine whose model is loaded and run by its backend in a child process (see :class:`Worker`).

    The artifact's files go to the child over the socket (an encrypted package's plaintext never touches a
    disk); the parent keeps them to load a restarted child. ``worker`` exposes the pid, restarts and exits.
    """

    thread_safe = True  # the worker's slots serialise; the child serialises an engine that is not reentrant

    def __init__(self, artifact: Any, options: Any, *, slots: int = 4, auto_restart: bool = True) -> None:
        from .backends import get_backend
        from .backends.base import check_options
        from .errors import InputError
        from .tensor import TensorSpec

        try:
            extra = json.loads(json.dumps(options.extra))
        except (TypeError, ValueError) as exc:
            raise InputError(f"engine options must be JSON values to reach a worker process: {exc}") from None
        # a misspelt option is refused here, before a child process starts, as load() would refuse it
        check_options(artifact.backend, "load", extra, get_backend(artifact.backend).load_options)
        names = list(artifact.files)
        args = {
            "backend": artifact.backend,
            "precision": artifact.precision,
            "options": artifact.options,
            "in_memory": artifact.in_memory,
            "files": [[n, len(artifact.files[n])] for n in names],
            "device": options.device,
            "threads": options.threads,
            "extra": extra,
        }
        payload = b"".join(artifact.files[n] for n in names)
        self.target = artifact.target
        self.worker = Worker(
            "luodi.isolation:load_engine",
            args,
            payload,
            label=f"the {artifact.target} engine",
            slots=slots,
            auto_restart=auto_restart,
        )
        info = self.worker.info
        super().__init__(
            [TensorSpec.from_dict(d) for d in info.get("inputs", [])],
            [TensorSpec.from_dict(d) for d in info.get("outputs", [])],
        )
        self.backend = artifact.backend

    def _run(self, feeds: Arrays) -> Arrays:
        return self.worker.call("run", None, feeds)[1]

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.worker.call("reshape", {"shapes": {n: list(s) for n, s in shapes.items()}})

    def restart(self) -> None:
        self.worker.restart()

    def close(self) -> None:
        super().close()
        self.worker.close()


class _EngineHandler:
    """In the child: the backend's Engine, loaded from the files the parent sent."""

    def __init__(self, args: dict[str, Any], payload: bytearray) -> None:
        from . import backends
        from .backends.base import Artifact, LoadOptions

        files, offset, view = {}, 0, memoryview(payload)
        for name, size in args["files"]:
            files[name] = bytes(view[offset : offset + size])
            offset += size
        artifact = Artifact(args["backend"], args["precision"], files, args["options"], args["in_memory"])
        self.backend = args["backend"]
        self.engine = backends.load_engine(artifact, LoadOptions(args["device"], args["threads"], args["extra"]))
        self.lock = None if self.engine.thread_safe else threading.Lock()
        self.info = {
            "inputs": [s.to_dict() for s in self.engine.inputs],
            "outputs": [s.to_dict() for s in self.engine.outputs],
        }

    def call(self, op: str, args: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        with self.lock or contextlib.nullcontext():
            if op == "run":  # Engine.run turns an engine's own exception into a BackendError naming the shapes
                return {}, self.engine.run(arrays)
            if op == "reshape":
                self.engine.reshape({n: tuple(s) for n, s in args["shapes"].items()})
                return {}, {}
        raise ValueError(f"unknown operation {op!r}")

    def close(self) -> None:
        self.engine.close()


def load_engine(args: dict[str, Any], payload: bytearray) -> _EngineHandler:
    return _EngineHandler(args, payload)
