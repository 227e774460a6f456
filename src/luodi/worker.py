"""Code in a worker process: an engine (or a vendor toolchain) whose crash is an error and a restart, not our death.

The parent sends files as raw bytes and tensors through shared memory (Linux memfd, sealed against shrinking);
control messages are JSON headers over a Unix socket. Nothing is pickled in either direction, and the parent
trusts nothing the child says: every offset, size and dtype it reports is checked before it is read.
It imports no engine: the child imports the handler's module (a backend, a toolchain driver) when told to.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import math
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .backends.base import Engine

log = logging.getLogger("luodi")

_PREFIX = struct.Struct("<IQ")  # JSON header length, raw payload length
_MAX_HEADER = 1 << 20  # a control message is small; a bigger one is a broken or hostile peer
_MAX_REGION = 1 << 36  # 64 GiB: a child that asks more is lying
_ALIGN = 64
_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
)
_CHILD = "from luodi.worker import child_main; child_main()"

Arrays = dict[str, np.ndarray]


class _Gone(Exception):
    """The peer closed its end of the socket (it exited or was killed) or broke the protocol."""


class _Hung(_Gone):
    """The peer did not answer within the call's timeout."""


# -- framing: a prefix, a JSON header, raw bytes -------------------------------------------------------------------
def _send(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_PREFIX.pack(len(head), len(payload)) + head)
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise _Gone("the peer closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytearray]:
    try:
        hlen, plen = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
        if hlen > _MAX_HEADER or plen > max_payload:
            raise _Gone(f"a message of {hlen} + {plen} bytes is over the protocol's limits")
        header = json.loads(_recv_exact(sock, hlen))
        payload = _recv_exact(sock, plen) if plen else bytearray()
    except TimeoutError:
        raise _Hung(f"no answer within {sock.gettimeout():g} s") from None
    except (OSError, ValueError) as exc:
        raise _Gone(f"the connection broke ({exc})") from exc
    if not isinstance(header, dict):
        raise _Gone("a control message is not a JSON object")
    return header, payload


# -- shared memory ---------------------------------------------------------------------------------------------------
class Region:
    """A memfd both processes map; the writer grows it (never shrinks: the parent seals it) and names its size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None

    @classmethod
    def create(cls, name: str) -> Region:
        if not hasattr(os, "memfd_create"):
            from .errors import BackendUnavailableError

            raise BackendUnavailableError(
                "running an engine in a worker process needs Linux memory files (memfd) for the tensors; "
                "this platform has none: run the model in-process (no isolate)"
            )
        fd = os.memfd_create(f"luodi-worker-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # A child that shrank the file under the parent's mapping would kill the parent with SIGBUS on its next read.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return cls(fd)

    def grow(self, nbytes: int) -> None:
        """Make room for ``nbytes`` (as the writer): extend the file by half again, then map it."""
        if nbytes > self.size:
            want = max(nbytes + nbytes // 2, 1 << 16)
            if os.fstat(self.fd).st_size < want:
                os.ftruncate(self.fd, want)
            self._map(want)

    def view(self, nbytes: int) -> mmap.mmap:
        """The mapping, covering at least ``nbytes`` (as the reader, after the writer said it wrote that much)."""
        if nbytes > self.size:
            real = os.fstat(self.fd).st_size
            if nbytes > real or nbytes > _MAX_REGION:
                raise _Gone(f"the peer named {nbytes} bytes of shared memory, but there are {real}")
            self._map(real if real <= _MAX_REGION else nbytes)  # a lying peer gets no huge map
        assert self.map is not None
        return self.map

    def _map(self, size: int) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):  # an engine still holds a view: the old map goes with it
                self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):
                self.map.close()
            self.map = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _write_arrays(region: Region, arrays: Arrays) -> list[dict[str, Any]]:
    """Lay ``arrays`` out in ``region`` (64-byte aligned) and return their descriptions for the header."""
    described: list[dict[str, Any]] = []
    if not arrays:
        return described
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.str not in _DTYPES:
            raise TypeError(f"tensor '{name}' has dtype {a.dtype}, which a worker process cannot carry")
        described.append({"name": str(name), "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    region.grow(offset)
    assert region.map is not None
    for d, a in zip(described, arrays.values()):
        a = np.asarray(a)
        np.frombuffer(region.map, a.dtype, a.size, d["offset"]).reshape(a.shape)[...] = a
    return described


def _read_arrays(region: Region, described: Any, copy: bool) -> Arrays:
    """The arrays ``described`` names in ``region``; every field checked, since the peer may be broken."""
    if not isinstance(described, list):
        raise _Gone("the tensor list is not a list")
    out: Arrays = {}
    for d in described:
        try:
            name, dtype, shape, offset = str(d["name"]), np.dtype(d["dtype"]), list(d["shape"]), int(d["offset"])
            if dtype.str not in _DTYPES or not all(isinstance(n, int) and n >= 0 for n in shape) or offset < 0:
                raise ValueError(f"{dtype} {shape} at {offset}")
        except (KeyError, TypeError, ValueError) as exc:
            raise _Gone(f"a malformed tensor description: {exc}") from exc
        count = math.prod(shape)
        mem = region.view(offset + count * dtype.itemsize)
        a = np.frombuffer(mem, dtype, count, offset).reshape(shape)
        out[name] = a.copy() if copy else a
    return out


# -- the parent's side ---------------------------------------------------------------------------------------------
class _Slot:
    """One connection to the child, with its own input and output memory: one call at a time goes through it."""

    def __init__(self, generation: int, index: int) -> None:
        self.generation = generation
        self.sock, self.child_sock = socket.socketpair()
        self.inp, self.out = Region.create(f"in{index}"), Region.create(f"out{index}")

    def child_fds(self) -> list[int]:
        return [self.child_sock.fileno(), self.inp.fd, self.out.fd]

    def call(self, message: dict[str, Any], arrays: Arrays, payload: bytes) -> tuple[dict[str, Any], Arrays]:
        message = {**message, "tensors": _write_arrays(self.inp, arrays) if arrays else []}
        try:
            _send(self.sock, message, payload)
        except OSError as exc:
            raise _Gone(f"cannot write to the worker ({exc})") from exc
        header, _ = _recv(self.sock, 0)  # a reply is a header; its data comes back as arrays
        return header, _read_arrays(self.out, header.get("tensors", []), copy=True)

    def hang_up(self) -> None:
        """Make the child see EOF (and a call blocked on this socket return); safe while another thread uses it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Free the socket and memory; only once no thread uses this slot."""
        for s in (self.sock, self.child_sock):
            with contextlib.suppress(OSError):
                s.close()
        self.inp.close()
        self.out.close()


class Worker:
    """A child process serving one handler: ``factory`` ("module:function") builds it there from (args, payload).

    :meth:`call` sends an operation with arrays (through shared memory) and returns the reply's header and
    arrays. Up to ``slots`` calls run at once. A child that dies (any signal, kill -9) fails the calls in flight
    with a BackendError naming ``label`` and the exit; with ``auto_restart`` a new child is started at once
    (calls arriving meanwhile wait for it), up to ``max_restarts`` crashes per ``window_s``; without, calls fail
    until :meth:`restart`. A call not answered within ``call_timeout_s`` (None: no limit) counts as a crash: the
    child is killed. ``python`` is the interpreter to run (another environment's, for a vendor toolchain); it
    must be able to import ``luodi.worker`` and the factory's module. Files go in as the load's ``payload`` or,
    like any other data in or out of a call, as (uint8) arrays.
    """

    def __init__(
        self,
        factory: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        label: str = "worker",
        slots: int = 1,
        auto_restart: bool = True,
        max_restarts: int = 5,
        window_s: float = 60.0,
        python: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 600.0,
        call_timeout_s: float | None = None,
    ) -> None:
        from .errors import InputError

        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise InputError(f"a worker needs slots >= 1 (concurrent calls), got {slots!r}")
        self.label, self.slots, self.auto_restart = label, slots, auto_restart
        self.max_restarts, self.window_s = max_restarts, window_s
        self._load = ({"op": "load", "factory": factory, "args": dict(args or {})}, payload)
        self._python, self._env, self._start_timeout = python or sys.executable, env, start_timeout_s
        self._call_timeout = call_timeout_s
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._generation = 0
        self._ended: dict[int, str] = {}  # generation -> how that child ended (set once)
        self._dead: str | None = "starting"  # why calls fail now (None: the child serves)
        self._starting = True
        self._closed = False
        self._inflight = 0
        self._crashes: list[float] = []
        self.restarts = 0
        """How many times a child was started after the first (after a crash or by restart())."""
        self.exits: list[str] = []
        """How each child that crashed ended, e.g. "was killed by SIGKILL", oldest first."""
        self.info: dict[str, Any] = {}
        """What the handler reported once loaded (an engine's input and output specs)."""
        self._start()

    # -- public ------------------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The serving child's process id (to watch it or, in a test, to kill it); None while there is none."""
        with self._cond:
            return self._proc.pid if self._proc is not None and self._dead is None else None

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    def describe(self) -> dict[str, Any]:
        """Pid, whether it serves, restarts and how the last children ended (for a status page)."""
        return {"pid": self.pid, "alive": self.alive, "restarts": self.restarts, "exits": list(self.exits[-5:])}

    def call(self, op: str, args: dict[str, Any] | None = None, arrays: Arrays | None = None) -> tuple[dict, Arrays]:
        """Run ``op`` in the child on ``arrays``; its reply's header and arrays (copied out of shared memory)."""
        from .errors import EngineCrashedError, StateError

        slot = self._acquire()
        try:
            header, out = slot.call({"op": op, "args": args or {}}, arrays or {}, b"")
        except _Gone as exc:
            if self._closed:
                raise StateError(f"{self.label} was closed while a call was running") from None
            hung = isinstance(exc, _Hung)
            raise EngineCrashedError(self._crashed(slot.generation, op, str(exc), hung)) from None
        finally:
            self._release(slot)
        if not header.get("ok"):
            raise _remote_error(header.get("error"), self.label)
        return header, out

    def restart(self) -> None:
        """Start a fresh child (after a crash, or to bring back a worker that stopped restarting itself)."""
        from .errors import StateError

        with self._cond:
            while self._starting and not self._closed:
                self._cond.wait()
            if self._closed:
                raise StateError(f"{self.label} is closed")
            self._starting = True
            self._crashes.clear()
            old = self._stop_child("restarted")
        self._reap(old)
        self._start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new calls, let those in flight finish (bounded), then end the child and free its memory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + timeout_s
            while (self._inflight or self._starting) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            old = self._stop_child("closed")
            self._cond.notify_all()
        self._reap(old)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the child's life ---------------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Start a child and load the handler in it; its slots become the free ones. The caller set _starting."""
        from .errors import BackendError, EngineCrashedError, LuodiError

        error: BaseException | None = None
        header: dict[str, Any] = {}
        with self._cond:
            self._generation += 1
            gen = self._generation
        proc, slots = None, []
        try:
            slots = [_Slot(gen, i) for i in range(self.slots)]
            fds = [fd for s in slots for fd in s.child_fds()]
            proc = subprocess.Popen(
                [self._python, "-c", _CHILD, ",".join(map(str, fds))],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=2,  # an engine's prints go to our stderr, never into a command's output
                env=self._env,
                start_new_session=True,  # Ctrl-C reaches the parent, which closes its workers in order
            )
            for s in slots:  # the child's ends live on only in the child, so that its death is our EOF
                s.child_sock.close()
            message, payload = self._load
            slots[0].sock.settimeout(self._start_timeout)
            try:
                header, _ = slots[0].call(message, {}, payload)
            finally:
                slots[0].sock.settimeout(self._call_timeout)
            for s in slots[1:]:
                s.sock.settimeout(self._call_timeout)
            if not header.get("ok"):
                error = _remote_error(header.get("error"), self.label)
        except _Gone as exc:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
            error = EngineCrashedError(
                f"{self.label}: the worker process {_exit_of(proc)} while loading the model ({exc})"
            )
        except Exception as exc:  # whatever it is, it must not leave the worker "starting" for ever
            error = exc if isinstance(exc, LuodiError) else BackendError(f"{self.label}: cannot start a worker ({exc})")
        with self._cond:
            adopted = error is None and not self._closed and gen == self._generation
            if adopted:
                self._proc, self._slots, self._free, self._dead = proc, slots, list(slots), None
                self.info = header.get("info") or {}
                if gen > 1:
                    self.restarts += 1
            else:
                self._ended[gen] = "failed to start"
                self._dead = str(error) if error is not None else "closed"
            self._starting = False
            self._cond.notify_all()
        if adopted:
            assert proc is not None
            threading.Thread(target=self._watch, args=(proc, gen), name="luodi-worker-watch", daemon=True).start()
            log.info(
                "%s: worker process %d started",
                self.label,
                proc.pid,
                extra={"event": "worker_started", "worker": self.label, "pid": proc.pid},
            )
            return
        for s in slots:
            s.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if error is not None:
            raise error

    def _watch(self, proc: subprocess.Popen, gen: int) -> None:
        """Notice a child that died while idle, so that its restart does not wait for a call to find it dead."""
        proc.wait()
        self._crashed(gen, None, "")

    def _crashed(self, gen: int, op: str | None, detail: str, hung: bool = False) -> str:
        """Record once that generation ``gen``'s child died and start another if allowed; the callers' message."""
        with self._cond:
            if gen == self._generation and gen not in self._ended and not self._closed:
                proc = self._proc
                assert proc is not None
                if not hung:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=2.0)  # the socket broke first: give the exit status a moment
                how = _exit_of(proc)
                if proc.poll() is None:  # alive, but hung or broke the protocol: end it
                    proc.kill()
                    proc.wait()
                    how = f"{how} ({detail}) and was killed"
                self.exits.append(how)
                now = time.monotonic()
                self._crashes = [t for t in self._crashes if now - t < self.window_s] + [now]
                self._ended[gen] = f"{self.label}: the worker process (pid {proc.pid}) {how}"
                self._dead = self._ended[gen]
                self._proc = None
                for s in self._slots:
                    s.hang_up()
                for s in self._free:
                    s.close()
                self._free = []
                log.error("%s", self._dead, extra={"event": "worker_died", "worker": self.label, "exit": how})
                if self.auto_restart and len(self._crashes) <= self.max_restarts:
                    self._starting = True
                    threading.Thread(target=self._start_quietly, name="luodi-worker-restart", daemon=True).start()
                elif self.auto_restart:
                    self._dead += (
                        f"; it died {len(self._crashes)} times within {self.window_s:.0f} s and is not restarted "
                        "again: fix the model or engine, then call restart() (or reload the model)"
                    )
            reason = self._ended.get(gen, f"{self.label}: the worker process stopped ({detail})")
            restarting = self._starting
        return reason + (f" during {op}" if op else "") + ("; it is being restarted" if restarting else "")

    def _start_quietly(self) -> None:
        try:
            self._start()
        except Exception as exc:  # the reason stays in _dead and goes to every call
            log.error("%s", exc, extra={"event": "worker_restart_failed", "worker": self.label})

    def _stop_child(self, why: str) -> subprocess.Popen | None:
        """With the lock held: detach the child and hang up its sockets (it sees EOF and exits)."""
        proc, self._proc = self._proc, None
        self._ended.setdefault(self._generation, f"{self.label} was {why}")
        self._dead = f"{self.label} is {why}" if why == "closed" else f"{self.label} is being {why}"
        for s in self._slots:
            s.hang_up()
        for s in self._free:
            s.close()
        self._free, self._slots = [], []
        return proc

    @staticmethod
    def _reap(proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in an engine call that never reads its socket again
            proc.kill()
            proc.wait()

    # -- slots -------------------------------------------------------------------------------------------------------
    def _acquire(self) -> _Slot:
        from .errors import EngineCrashedError, StateError

        with self._cond:
            while True:
                if self._closed:
                    raise StateError(f"{self.label} is closed")
                if self._starting:
                    self._cond.wait()
                elif self._dead is not None:
                    raise EngineCrashedError(self._dead)
                elif self._free:
                    self._inflight += 1
                    return self._free.pop()
                else:
                    self._cond.wait()

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            self._inflight -= 1
            if slot in self._slots and self._dead is None:
                self._free.append(slot)
            else:  # its child is gone: nobody else holds this slot now
                slot.close()
            self._cond.notify_all()


def _exit_of(proc: subprocess.Popen | None) -> str:
    rc = None if proc is None else proc.poll()
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _remote_error(error: Any, label: str) -> Exception:
    """The child's error as the luodi error class it named (only those), else a BackendError with its message."""
    from . import errors

    if not isinstance(error, dict):
        return errors.BackendError(f"{label}: the worker failed without saying why")
    message = str(error.get("message", ""))[:2000]
    cls = getattr(errors, str(error.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, errors.LuodiError) and cls.__init__ is Exception.__init__:
        return cls(message)
    return errors.BackendError(f"{label}: {error.get('type', 'error')}: {message}")


# -- the engine in a worker ------------------------------------------------------------------------------------------
def isolated_engine(artifact: Any, options: Any, isolate: bool | int | str) -> Engine:
    """The Engine for Session(isolate=...): True, an int (how many runs in flight), or "auto" (crash-prone only)."""
    from .backends import get_backend
    from .errors import InputError

    if isolate == "auto":
        if not getattr(get_backend(artifact.backend), "crash_prone", False):
            from .session import _load

            return _load(artifact, options)
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
        from .errors import InputError
        from .tensor import TensorSpec

        try:
            extra = json.loads(json.dumps(options.extra))
        except (TypeError, ValueError) as exc:
            raise InputError(f"engine options must be JSON values to reach a worker process: {exc}") from None
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
            "luodi.worker:load_engine",
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

    def run(self, feeds: Arrays) -> Arrays:
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
        from .backends.base import Artifact, LoadOptions
        from .session import _load

        files, offset, view = {}, 0, memoryview(payload)
        for name, size in args["files"]:
            files[name] = bytes(view[offset : offset + size])
            offset += size
        artifact = Artifact(args["backend"], args["precision"], files, args["options"], args["in_memory"])
        self.backend = args["backend"]
        self.engine = _load(artifact, LoadOptions(args["device"], args["threads"], args["extra"]))
        self.lock = None if self.engine.thread_safe else threading.Lock()
        self.info = {
            "inputs": [s.to_dict() for s in self.engine.inputs],
            "outputs": [s.to_dict() for s in self.engine.outputs],
        }

    def call(self, op: str, args: dict[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        with self.lock or contextlib.nullcontext():
            if op == "run":
                try:
                    return {}, self.engine.run(arrays)
                except Exception as exc:
                    from .errors import BackendError, LuodiError

                    if isinstance(exc, LuodiError):
                        raise
                    shapes = {n: list(a.shape) for n, a in arrays.items()}
                    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
                    raise BackendError(f"{self.backend} failed to run the model on inputs {shapes}: {detail}") from exc
            if op == "reshape":
                self.engine.reshape({n: tuple(s) for n, s in args["shapes"].items()})
                return {}, {}
        raise ValueError(f"unknown operation {op!r}")

    def close(self) -> None:
        self.engine.close()


def load_engine(args: dict[str, Any], payload: bytearray) -> _EngineHandler:
    return _EngineHandler(args, payload)


# -- the child's side ----------------------------------------------------------------------------------------------
def child_main() -> None:
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
        header, payload = _recv(sock, 1 << 40)
    except _Gone:
        return None
    try:
        module, _, name = str(header.get("factory", "")).partition(":")
        factory: Callable[..., Any] = getattr(importlib.import_module(module), name)
        handler = factory(header.get("args", {}), payload)
    except BaseException as exc:  # reported to the parent, which raises it there
        _send(sock, {"ok": False, "error": _error_of(exc)})
        return None
    del payload
    _send(sock, {"ok": True, "info": getattr(handler, "info", {}), "tensors": []})
    return handler


def _serve(slot: tuple[socket.socket, Region, Region], handler: Any) -> None:
    sock, inp, out = slot
    while True:
        try:
            header, _ = _recv(sock, 0)
        except _Gone:
            return
        try:
            arrays = _read_arrays(inp, header.get("tensors", []), copy=False)
            reply, results = handler.call(str(header.get("op")), header.get("args") or {}, arrays)
            del arrays
            reply = {**reply, "ok": True, "tensors": _write_arrays(out, results)}
        except BaseException as exc:  # the parent raises it; the child serves on
            reply = {"ok": False, "error": _error_of(exc)}
        try:
            _send(sock, reply)
        except OSError:
            return


def _error_of(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}
