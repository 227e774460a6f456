"""The parent's side of a worker process: start it, call it, notice its death (any signal), restart it, close it.

It imports no engine; the child builds its handler from a factory name ("module:function") when told to.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .wire import Arrays, Gone, Hung, Region, read_arrays, recv, send, write_arrays

log = logging.getLogger("luodi")

_CHILD = "from luodi.worker.child import main; main()"
# A bare child (another environment's Python, which has none of luodi's dependencies): every package on the way to
# the child loop and to the factory's module is registered as an empty module whose __path__ is its folder here, so
# that importing them runs no __init__.py (luodi's imports rich, numpy 2, ...). Run with -I: that environment's own
# site-packages only, no PYTHONPATH, no user site, not the working directory.
_BARE_CHILD = """import sys, types
root, packages = sys.argv[2], sys.argv[3].split(",")
for name in packages:
    module = types.ModuleType(name)
    module.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = module
from luodi.worker.child import main
main()
"""


def bare_packages(factory: str) -> list[str]:
    """The packages a bare child registers without running their __init__: luodi, luodi.worker and every package
    above the factory's module (``luodi.backends._rknn_child:load`` -> luodi, luodi.worker, luodi.backends)."""
    module = factory.partition(":")[0]
    parts = module.split(".")
    wanted = ["luodi", "luodi.worker"] + [".".join(parts[:i]) for i in range(1, len(parts))]
    return list(dict.fromkeys(wanted))


class _Slot:
    """One connection to the child, with its own input and output memory: one call at a time goes through it."""

    def __init__(self, generation: int, index: int) -> None:
        self.generation = generation
        self.sock, self.child_sock = socket.socketpair()
        self.inp, self.out = Region.create(f"in{index}"), Region.create(f"out{index}")

    def child_fds(self) -> list[int]:
        return [self.child_sock.fileno(), self.inp.fd, self.out.fd]

    def call(self, message: dict[str, Any], arrays: Arrays, payload: bytes) -> tuple[dict[str, Any], Arrays]:
        message = {**message, "tensors": write_arrays(self.inp, arrays) if arrays else []}
        try:
            send(self.sock, message, payload)
        except OSError as exc:
            raise Gone(f"cannot write to the worker ({exc})") from exc
        header, _ = recv(self.sock, 0)  # a reply is a header; its data comes back as arrays
        return header, read_arrays(self.out, header.get("tensors", []), copy=True)

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
    must be able to import ``luodi.worker`` and the factory's module. With ``bare`` the child runs with ``-I``
    and imports this luodi's files without running any package's ``__init__.py`` (see :func:`bare_packages`): what
    a vendor toolchain's environment, which has none of luodi's dependencies, needs; the factory's module must
    then import only the standard library, numpy and the toolkit. Files go in as the load's ``payload`` or, like
    any other data in or out of a call, as (uint8) arrays.
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
        bare: bool = False,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 600.0,
        call_timeout_s: float | None = None,
    ) -> None:
        from ..errors import InputError

        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise InputError(f"a worker needs slots >= 1 (concurrent calls), got {slots!r}")
        self.label, self.slots, self.auto_restart = label, slots, auto_restart
        self.max_restarts, self.window_s = max_restarts, window_s
        self._load = ({"op": "load", "factory": factory, "args": dict(args or {})}, payload)
        self._python, self._env, self._start_timeout = python or sys.executable, env, start_timeout_s
        self._call_timeout = call_timeout_s
        self._command = [self._python, "-c", _CHILD]
        if bare:
            from ..paths import source_root

            self._command = [self._python, "-I", "-c", _BARE_CHILD]
            self._bare_args = [str(source_root()), ",".join(bare_packages(factory))]
        else:
            self._bare_args = []
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
        from ..errors import EngineCrashedError, StateError

        slot = self._acquire()
        try:
            header, out = slot.call({"op": op, "args": args or {}}, arrays or {}, b"")
        except Gone as exc:
            if self._closed:
                raise StateError(f"{self.label} was closed while a call was running") from None
            hung = isinstance(exc, Hung)
            raise EngineCrashedError(self._crashed(slot.generation, op, str(exc), hung)) from None
        finally:
            self._release(slot)
        if not header.get("ok"):
            raise _remote_error(header.get("error"), self.label)
        return header, out

    def restart(self) -> None:
        """Start a fresh child (after a crash, or to bring back a worker that stopped restarting itself)."""
        from ..errors import StateError

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
        from ..errors import BackendError, EngineCrashedError, LuodiError

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
                [*self._command, ",".join(map(str, fds)), *self._bare_args],
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
        except Gone as exc:
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
        from ..errors import EngineCrashedError, StateError

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
    from .. import errors

    if not isinstance(error, dict):
        return errors.BackendError(f"{label}: the worker failed without saying why")
    message = str(error.get("message", ""))[:2000]
    cls = getattr(errors, str(error.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, errors.LuodiError) and cls.__init__ is Exception.__init__:
        return cls(message)
    return errors.BackendError(f"{label}: {error.get('type', 'error')}: {message}")
