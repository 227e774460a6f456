"""Engines in a worker process (luodi.worker): the same outputs; a crash is an EngineCrashedError, then a restart.

Real onnxruntime engines in real child processes; the crashes are real signals (kill -9, a segfault).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import luodi
from conftest import small_cnn
from luodi.backends.base import Artifact, LoadOptions
from luodi.errors import BackendError, EngineCrashedError, InputError, StateError
from luodi.isolation import WorkerEngine
from luodi.worker import Worker
from luodi.worker.wire import Gone, Region, read_arrays

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need Linux memfd")


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _gone(pid: int) -> bool:
    """The process has exited and been reaped: a zombie still has its /proc entry."""
    return not Path(f"/proc/{pid}").exists()


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _shm() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if "luodi" in n] if os.path.isdir("/dev/shm") else []


@pytest.fixture(scope="module")
def reference() -> luodi.Session:
    with luodi.Session(small_cnn()) as s:
        yield s


def test_isolated_session_gives_the_in_process_outputs(cnn_package: Path, reference: luodi.Session) -> None:
    with luodi.Session(cnn_package, backend="onnxruntime", isolate=True) as s:
        s.prepare()  # a call without tensors first (reshape), then the warm-up run
        assert s.worker is not None and s.worker.pid != os.getpid()
        assert [i.name for i in s._engine.inputs] == ["x"]  # the child reported the engine's specs
        for batch in (1, 3):
            np.testing.assert_array_equal(s.run({"x": _x(batch)})["y"], reference.run({"x": _x(batch)})["y"])
        s.set_tensor("x", _x(2, 1))  # the six verbs go through the worker too
        s.forward()
        np.testing.assert_array_equal(s.get_tensor("y"), reference.run({"x": _x(2, 1)})["y"])
        s.prepare({"x": (4, 3, 16, 16)})
        with pytest.raises(luodi.ShapeError):  # checked in the parent, before the worker
            s.run({"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_auto_isolates_only_crash_prone_engines(cnn_package: Path) -> None:
    with luodi.Session(cnn_package, backend="onnxruntime", isolate="auto") as s:
        assert s.worker is None  # onnxruntime has not been seen to crash on a malformed file
    with pytest.raises(InputError, match="isolate"):
        luodi.Session(cnn_package, backend="onnxruntime", isolate=0.5)


def test_kill_9_fails_the_calls_in_flight_then_the_worker_restarts(cnn_package: Path, reference) -> None:
    s = luodi.Session(cnn_package, backend="onnxruntime", isolate=True)
    first = s.worker.pid
    x = _x(64)
    want = reference.run({"x": x})["y"]
    errors: list[BaseException] = []
    answers = [0]
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_array_equal(s.run({"x": x})["y"], want)
                answers[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is inspected below
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    time.sleep(1.0)
    before = answers[0]
    deadline = time.monotonic() + 30
    while answers[0] < before + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    assert answers[0] >= before + 10, "the restarted worker did not answer"
    assert errors, "three clients running back to back: the kill must land in a call"
    for exc in errors:
        assert isinstance(exc, EngineCrashedError), repr(exc)
        assert "SIGKILL" in str(exc) and "onnxruntime-fp32" in str(exc) and str(first) in str(exc)
    assert s.worker.restarts == 1 and s.worker.exits == ["was killed by SIGKILL"]
    assert s.worker.pid not in (None, first)
    assert _wait_gone(first), "the killed child was not reaped"
    second = s.worker.pid
    s.close()
    assert _wait_gone(second)


def test_without_auto_restart_calls_fail_until_restart(reference) -> None:
    art = luodi.get_backend("onnxruntime").compile(small_cnn(), luodi.backends.CompileOptions())
    fds = _fds()
    engine = WorkerEngine(art, LoadOptions(), auto_restart=False)
    pid = engine.worker.pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(2):  # this call and every later one, until restart()
        with pytest.raises(EngineCrashedError, match=r"onnxruntime-fp32.*SIGKILL"):
            engine.run({"x": _x(1)})
    assert engine.worker.restarts == 0 and engine.worker.pid is None
    engine.restart()
    np.testing.assert_array_equal(engine.run({"x": _x(1)})["y"], reference.run({"x": _x(1)})["y"])
    assert engine.worker.restarts == 1
    second = engine.worker.pid
    engine.close()
    assert _wait_gone(pid) and _wait_gone(second)
    assert _fds() == fds, "sockets or memory files left open in the parent"
    assert _shm() == []
    with pytest.raises(StateError):
        engine.run({"x": _x(1)})


def test_close_waits_for_runs_in_flight_and_frees_everything(cnn_package: Path) -> None:
    fds = _fds()
    s = luodi.Session(cnn_package, backend="onnxruntime", isolate=True)
    pid = s.worker.pid
    outcomes: list[str] = []

    def client() -> None:
        for _ in range(200):
            try:
                s.run({"x": _x(32)})
            except StateError:
                outcomes.append("closed")
                return
        outcomes.append("done")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    s.close()
    for t in threads:
        t.join(30)
    assert outcomes and set(outcomes) <= {"closed", "done"}  # never a crash error or a hang
    assert _wait_gone(pid)
    assert _fds() == fds
    assert _shm() == []


def test_a_load_error_in_the_child_is_the_same_luodi_error() -> None:
    bad = Artifact("onnxruntime", "fp32", {"model.onnx": b"not a model"})
    with pytest.raises(luodi.CompileError) as in_process:
        luodi.backends.load_engine(bad, LoadOptions())
    with pytest.raises(luodi.CompileError) as isolated:
        WorkerEngine(bad, LoadOptions())
    assert str(isolated.value) == str(in_process.value)
    with pytest.raises(InputError, match="JSON"):
        WorkerEngine(bad, LoadOptions(extra={"session": object()}))


CRASHY = """
import ctypes, os, numpy as np

class Handler:
    info = {"kind": "toolchain"}

    def __init__(self, args, payload):
        if args.get("crash_on_load"):
            ctypes.string_at(0)
        self.files = bytes(payload)

    def call(self, op, args, arrays):
        if op == "segfault":
            ctypes.string_at(0)
        if op == "exit":
            os._exit(3)
        if op == "hang":
            import time
            time.sleep(3600)
        if op == "fail":
            raise ValueError("the toolchain refused it")
        return {"files": len(self.files)}, {k: v * 2 for k, v in arrays.items()}

def load(args, payload):
    return Handler(args, payload)
"""


@pytest.fixture
def crashy(tmp_path: Path) -> dict[str, str]:
    """A child environment whose handler can crash on demand (what a vendor toolchain might do)."""
    (tmp_path / "crashy.py").write_text(CRASHY)
    src = str(Path(luodi.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}


@pytest.mark.slow
def test_a_generic_worker_takes_files_and_arrays_and_survives_its_handler(crashy: dict[str, str]) -> None:
    with Worker("crashy:load", {}, b"model bytes", label="the test toolchain", env=crashy, slots=2) as w:
        assert w.info == {"kind": "toolchain"}
        a = np.arange(12, dtype=np.int8).reshape(3, 4)
        b = np.linspace(0, 1, 5_000_000)  # 40 MB: the shared memory grows
        header, out = w.call("double", {}, {"a": a, "b": b})
        assert header["files"] == len(b"model bytes")
        np.testing.assert_array_equal(out["a"], a * 2)
        np.testing.assert_array_equal(out["b"], b * 2)
        with pytest.raises(BackendError, match="ValueError: the toolchain refused it"):
            w.call("fail")
        pid = w.pid
        with pytest.raises(EngineCrashedError, match=r"the test toolchain.*SIGSEGV during segfault"):
            w.call("segfault")
        np.testing.assert_array_equal(w.call("double", {}, {"a": a})[1]["a"], a * 2)  # restarted
        with pytest.raises(EngineCrashedError, match="exited with code 3"):
            w.call("exit")
        assert w.exits == ["was killed by SIGSEGV", "exited with code 3"]
        assert _wait_gone(pid)
    with pytest.raises(EngineCrashedError, match=r"SIGSEGV while loading"):
        Worker("crashy:load", {"crash_on_load": True}, env=crashy)


def test_a_call_that_hangs_past_its_timeout_kills_the_child(crashy: dict[str, str]) -> None:
    with Worker("crashy:load", env=crashy, call_timeout_s=1.0) as w:
        pid = w.pid
        t0 = time.monotonic()
        with pytest.raises(EngineCrashedError, match=r"stopped answering \(no answer within 1 s\) and was killed"):
            w.call("hang")
        assert time.monotonic() - t0 < 10
        assert w.call("double", {}, {"a": np.ones(2)})[1]["a"].tolist() == [2.0, 2.0]  # restarted
        assert _wait_gone(pid)


def test_a_worker_that_crashes_in_a_loop_stops_being_restarted(crashy: dict[str, str]) -> None:
    with Worker("crashy:load", env=crashy, max_restarts=2, window_s=60) as w:
        for _ in range(3):
            with pytest.raises(EngineCrashedError):
                w.call("segfault")
        with pytest.raises(EngineCrashedError, match=r"died 3 times within 60 s.*restart\(\)"):
            w.call("double", {}, {"a": np.ones(2)})
        w.restart()
        assert w.call("double", {}, {"a": np.ones(2)})[1]["a"].tolist() == [2.0, 2.0]


def test_the_parent_checks_what_the_child_says_about_shared_memory() -> None:
    region = Region.create("test")
    try:
        region.grow(100)
        with pytest.raises(Gone, match="shared memory"):  # past the end of the file: no SIGBUS in the parent
            read_arrays(region, [{"name": "y", "dtype": "<f4", "shape": [1 << 30], "offset": 0}], copy=True)
        with pytest.raises(Gone, match="malformed"):
            read_arrays(region, [{"name": "y", "dtype": "|O", "shape": [1], "offset": 0}], copy=True)
        with pytest.raises(Gone, match="malformed"):
            read_arrays(region, [{"name": "y", "dtype": "<f4", "shape": [-1], "offset": 0}], copy=True)
        with pytest.raises(OSError):  # sealed: a child cannot shrink it under the parent's mapping
            os.ftruncate(region.fd, 10)
    finally:
        region.close()


def test_runs_in_flight_at_once_from_many_threads(cnn_package: Path, reference) -> None:
    with luodi.Session(cnn_package, backend="onnxruntime", isolate=2) as s:
        failures: list[str] = []

        def client(seed: int) -> None:
            for i in range(20):
                x = _x(1 + (seed + i) % 4, seed * 100 + i)
                if not np.array_equal(s.run({"x": x})["y"], reference.run({"x": x})["y"]):
                    failures.append(f"thread {seed} call {i}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_an_encrypted_package_runs_in_the_worker_from_memory(tmp_path: Path, cnn_package: Path, reference) -> None:
    from luodi.package import crypto

    sealed = crypto.encrypt_package(cnn_package, tmp_path / "sealed.luodi", passphrase="correct horse")
    with luodi.Session(sealed, backend="onnxruntime", passphrase="correct horse", isolate=True) as s:
        np.testing.assert_array_equal(s.run({"x": _x(2)})["y"], reference.run({"x": _x(2)})["y"])
        pkg = luodi.Package(cnn_package)
        plain = pkg.artifact(next(t for t in pkg.manifest["targets"] if t["backend"] == "onnxruntime")).files
        model = max(plain.values(), key=len)
        fd_dir = Path(f"/proc/{s.worker.pid}/fd")
        # the plaintext came over the socket: no file the child holds open, memory files aside, contains it
        for fd in fd_dir.iterdir():
            target = os.readlink(fd)
            if target.startswith("/") and not target.startswith(("/memfd:", "/dev/")) and fd.is_file():
                assert model not in fd.read_bytes()[: 1 << 26], f"the model's plaintext is in {target}"


ENGINES = ("onnxruntime", "openvino", "ncnn", "mnn", "reference")


@pytest.fixture(scope="module")
def every_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import installed

    path = tmp_path_factory.mktemp("engines") / "cnn.luodi"
    luodi.compile(small_cnn(), path, targets=[b for b in ENGINES if installed(b)], name="small-cnn", verify=False)
    return path


@pytest.mark.parametrize("backend", ENGINES)
def test_every_engine_runs_in_a_worker_with_the_same_outputs(every_engine: Path, backend: str) -> None:
    from conftest import installed

    if not installed(backend):
        pytest.skip(f"{backend} is not installed (make test installs every engine)")
    x = _x(2, 3)
    with (
        luodi.Session(every_engine, backend=backend) as a,
        luodi.Session(every_engine, backend=backend, isolate=True) as w,
    ):
        w.prepare({"x": (2, 3, 16, 16)})  # reshape goes to the child too (OpenVINO compiles a static copy)
        np.testing.assert_array_equal(w.run({"x": x})["y"], a.run({"x": x})["y"])


def test_an_engine_that_segfaults_on_a_malformed_file_costs_only_its_worker(every_engine: Path) -> None:
    """MNN trusts its flatbuffer: this one-byte change to the small CNN's model.mnn segfaults MNN's loader."""
    from conftest import installed

    if not installed("mnn"):
        pytest.skip("mnn is not installed (make test installs every engine)")
    pkg = luodi.Package(every_engine)
    artifact = pkg.artifact(next(t for t in pkg.manifest["targets"] if t["backend"] == "mnn"))
    model = bytearray(artifact.files["model.mnn"])
    offset, was, now = 1300, 1, 15
    assert model[offset] == was, "MNN converted the small CNN differently: find a crashing byte again"
    model[offset] = now
    artifact.files["model.mnn"] = bytes(model)
    with pytest.raises(EngineCrashedError, match=r"the mnn-fp32 engine: the worker process was killed by SIGSEGV"):
        WorkerEngine(artifact, LoadOptions())
