"""Code in a worker process: an engine (or a vendor toolchain) whose crash is an error and a restart, not our death.

``Worker`` (process.py) runs a handler in a child process and calls it with arrays; ``WorkerEngine`` (engine.py)
is the Engine that ``Session(isolate=...)`` and ``luodi serve --isolate`` use; wire.py is the protocol and the
shared memory, child.py the child's loop. The parent sends files as raw bytes and tensors through shared memory
(Linux memfd, sealed against shrinking); control messages are JSON headers over a Unix socket. Nothing is
pickled in either direction, and the parent trusts nothing the child says.
"""

from __future__ import annotations

from .engine import WorkerEngine, isolated_engine
from .process import Worker

__all__ = ["Worker", "WorkerEngine", "isolated_engine"]
