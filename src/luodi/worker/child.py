"""The child's side of a worker process: build the handler from the parent's load message, then serve its calls.

Run as ``python -c "from luodi.worker.child import main; main()" FDS``; it never unpickles anything.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from .wire import Gone, Region, read_arrays, recv, send, write_arrays


def main() -> None:
    """The child's entry point: argv[1] lists, per slot, the socket, input memfd and output memfd."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    fds = [int(x) for x in sys.argv[1].split(",")]
    slots = [(socket.socket(fileno=fds[i]), Region(fds[i + 1]), Region(fds[i + 2])) for i in range(0, len(fds), 3)]
    handler = _serve_load(*slots[0])
    if handler is None:
        os._exit(1)
    threads = [threading.Thread(target=_serve, args=(s, handler), daemon=True) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with contextlib.suppress(Exception):
        handler.close()
    os._exit(0)  # skip interpreter teardown: an engine's destructors at exit are not our business


def _serve_load(sock: socket.socket, inp: Region, out: Region) -> Any:
    try:
        header, payload = recv(sock, 1 << 40)
    except Gone:
        return None
    try:
        module, _, name = str(header.get("factory", "")).partition(":")
        factory: Callable[..., Any] = getattr(importlib.import_module(module), name)
        handler = factory(header.get("args", {}), payload)
    except BaseException as exc:  # reported to the parent, which raises it there
        send(sock, {"ok": False, "error": _error_of(exc)})
        return None
    del payload
    send(sock, {"ok": True, "info": getattr(handler, "info", {}), "tensors": []})
    return handler


def _serve(slot: tuple[socket.socket, Region, Region], handler: Any) -> None:
    sock, inp, out = slot
    while True:
        try:
            header, _ = recv(sock, 0)
        except Gone:
            return
        try:
            arrays = read_arrays(inp, header.get("tensors", []), copy=False)
            reply, results = handler.call(str(header.get("op")), header.get("args") or {}, arrays)
            del arrays
            reply = {**reply, "ok": True, "tensors": write_arrays(out, results)}
        except BaseException as exc:  # the parent raises it; the child serves on
            reply = {"ok": False, "error": _error_of(exc)}
        try:
            send(sock, reply)
        except OSError:
            return


def _error_of(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


class _Echo:
    """A handler that returns its arrays and says which of luodi's modules this process imported: what a test (and
    a check of a toolchain's environment) uses to see that a bare child ran no package ``__init__``."""

    def __init__(self) -> None:
        self.info = {"python": sys.version.split()[0], "prefix": sys.prefix, "luodi_modules": _luodi_modules()}

    def call(self, op: str, args: dict[str, Any], arrays: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if op == "exit":  # a child that dies in a call, as a crashing toolkit would
            os._exit(int(args.get("code", 3)))
        return {"luodi_modules": _luodi_modules()}, dict(arrays)

    def close(self) -> None:
        pass


def _luodi_modules() -> list[str]:
    return sorted(m for m in sys.modules if m == "luodi" or m.startswith("luodi."))


def echo(args: dict[str, Any], payload: bytes) -> _Echo:
    return _Echo()
