"""A malformed engine file or a close() under load never takes the process down.

Each scenario that crashed the process before runs in a child Python, so that on a regression the test fails
(with the child's exit signal) instead of killing the test run: a malformed ncnn model.param and a one-byte
change to an MNN model.mnn are a BackendError from the probe (luodi.backends.probe) and the probe's verdict is
cached by sha256; close() while 8 threads are in run() waits for them on all five engines.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import luodi
from conftest import installed

ENGINES = ["onnxruntime", "openvino", "ncnn", "mnn", "torch"]


def repinned(package: bytes, changes: dict[str, bytes]) -> bytes:
    """``package`` with members replaced and their sha256/size pinned again: the bytes reach the engine."""
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    for name, data in changes.items():
        members[name] = data
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def in_child(code: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (this checkout's luodi); a crash there is the test's failure, not the run's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(luodi.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_survived(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"the process died (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


# -- close() during run() ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_package(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install 'luodi[torch]'")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
    path = tmp_path_factory.mktemp("iso") / "conv.luodi"
    luodi.export(module.eval(), torch.zeros(1, 3, 32, 32), path, targets=[e for e in ENGINES if installed(e)])
    return path


CLOSE_UNDER_LOAD = """
    import sys, threading, numpy as np, luodi
    for attempt in range(3):
        s = luodi.Session(sys.argv[1], backend=sys.argv[2])
        x = np.ones((1, 3, 32, 32), np.float32)
        want = s.run({s.inputs[0].name: x})
        started, ends, bad = threading.Barrier(9), [], []
        def worker():
            started.wait()
            try:
                while True:
                    got = s.run({s.inputs[0].name: x})
                    if not all(np.array_equal(got[k], want[k]) for k in want):
                        bad.append("a run during close() gave wrong values")
            except luodi.StateError as exc:
                ends.append(str(exc))
            except BaseException as exc:
                bad.append(f"{type(exc).__name__}: {exc}")
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        started.wait()
        threading.Event().wait(0.05)
        s.close()
        for t in threads:
            t.join(60)
        assert not bad, bad
        assert len(ends) == 8 and all("closed" in e for e in ends), ends
    print("ok")
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_close_while_eight_threads_run(conv_package, tmp_path, engine):
    if not installed(engine):
        pytest.skip(f"{engine} is not installed (make test installs every engine)")
    out = assert_survived(in_child(CLOSE_UNDER_LOAD, tmp_path, str(conv_package), engine))
    assert out.strip().endswith("ok")
