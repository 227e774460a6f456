"""Code in a worker process: an engine (or a vendor toolchain) whose crash is an error and a restart, not our death.

``Worker`` (process.py) runs a handler in a child process and calls it with arrays; wire.py is the protocol and the
shared memory, child.py the child's loop. The parent sends files as raw bytes and tensors through shared memory
(Linux memfd, sealed against shrinking); control messages are JSON headers over a Unix socket. Nothing is
pickled in either direction, and the parent trusts nothing the child says.

This package sits below the backends (it imports no engine and nothing of luodi but errors and paths), so that a
backend can drive a vendor toolchain in another Python environment through it (``Worker(..., bare=True)``: the
child then imports only this package's child side and the factory's module, never ``luodi/__init__.py``).
``WorkerEngine``, the Engine of ``Session(isolate=...)``, loads backends and so lives above them, in
luodi.isolation.
"""

from __future__ import annotations

from .process import Worker

__all__ = ["Worker"]
