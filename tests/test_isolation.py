"""A malformed engine file or a close() under load never takes the process down.

Each scenario that crashed the process before runs in a child Python, so that on a regression the test fails
(with the child's exit signal) instead of killing the test run: a malformed ncnn model.param and a one-byte
change to an MNN model.mnn are a BackendError from the probe (luodi.backends.probe) and the probe's verdict is
cached by sha256 (`luodi verify` and auto-selection survive such a target too); a package checked with trust=
skips the probe; close() while 8 threads are in run() waits for them on all five engines.
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

import numpy as np
import pytest

import luodi
from conftest import installed, small_cnn

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
        s = luodi.Session(sys.argv[1], backend=sys.argv[2], allow_failed=True)  # MNN misses fp32 here: not the point
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
@pytest.mark.slow
def test_close_while_eight_threads_run(conv_package, tmp_path, engine):
    if not installed(engine):
        pytest.skip(f"{engine} is not installed (make test installs every engine)")
    out = assert_survived(in_child(CLOSE_UNDER_LOAD, tmp_path, str(conv_package), engine))
    assert out.strip().endswith("ok")


# -- malformed engine files: validated, then proven in a child process -----------------------------------------
@pytest.fixture(scope="module")
def effnet_engines(tmp_path_factory, effnet_source):
    if not (installed("ncnn") and installed("mnn")):
        pytest.skip("ncnn and mnn are needed (make test installs every engine)")
    path = tmp_path_factory.mktemp("iso-effnet") / "effnet.luodi"
    luodi.compile(effnet_source, path, targets=["ncnn", "mnn"], name="efficientnet-lite0", verify=False)
    return path


PROBE_THEN_CACHE = """
    import os, sys, numpy as np, luodi
    from pathlib import Path
    good, bad, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        with luodi.Session(bad, backend=backend) as s:
            s.run({"images": np.ones((1, 3, 224, 224), np.float32)})  # where it crashed
    except luodi.BackendError as exc:
        print("refused:", exc)
    else:
        raise SystemExit("the malformed target loaded and ran")
    with luodi.Session(good, backend=backend) as s:
        s.run({"images": np.ones((1, 3, 224, 224), np.float32)})
    print("markers:", len(list(Path(os.environ["LUODI_CACHE_DIR"], "probed").iterdir())))
"""

CACHED = """
    import sys, numpy as np, luodi
    import luodi.backends.probe as probe
    def no_child(*args):
        raise AssertionError("the probe ran again for an artifact that passed before")
    probe._run_child = no_child
    with luodi.Session(sys.argv[1], backend=sys.argv[2]) as s:
        s.run({"images": np.ones((1, 3, 224, 224), np.float32)})
    print("cached")
"""


@pytest.fixture(scope="module")
def bad_ncnn_effnet(effnet_engines, tmp_path_factory):
    """EfficientNet-Lite0 whose ncnn param has one layer parameter changed (convclip_1's num_output 96 -> 4)."""
    with zipfile.ZipFile(effnet_engines) as zf:
        param = zf.read("targets/ncnn-fp32/model.param").decode()
    line = next(ln for ln in param.splitlines() if " convclip_1 " in ln)
    assert " 0=96 " in line
    bad = tmp_path_factory.mktemp("iso-bad") / "bad.luodi"
    changed = param.replace(line, line.replace(" 0=96 ", " 0=4 "))
    bad.write_bytes(repinned(effnet_engines.read_bytes(), {"targets/ncnn-fp32/model.param": changed.encode()}))
    return bad


@pytest.mark.slow
def test_malformed_ncnn_param_is_a_backend_error_and_good_files_are_probed_once(
    effnet_engines, bad_ncnn_effnet, tmp_path, monkeypatch
):
    """Finding 2: one changed layer parameter (num_output 96 -> 4) segfaulted Session.run."""
    monkeypatch.setenv("LUODI_CACHE_DIR", str(tmp_path / "cache"))
    bad = bad_ncnn_effnet
    out = assert_survived(in_child(PROBE_THEN_CACHE, tmp_path, str(effnet_engines), str(bad), "ncnn"))
    assert "refused: the ncnn-fp32 engine file is malformed: ncnn crashed (SIGSEGV)" in out
    assert "markers: 1" in out  # the good file passed and is remembered; the bad one is not
    assert_survived(in_child(CACHED, tmp_path, str(effnet_engines), "ncnn"))


@pytest.fixture(scope="module")
def cnn_mnn(tmp_path_factory):
    if not installed("mnn"):
        pytest.skip("mnn is not installed (make test installs every engine)")
    path = tmp_path_factory.mktemp("iso-mnn") / "cnn.luodi"
    luodi.compile(small_cnn(), path, targets=["mnn"], name="small-cnn", verify=False)
    return path


# One-byte changes to the small CNN's model.mnn (MNN 3.6.1) that segfaulted luodi.Session(): (offset, was, now).
MNN_CRASHERS = [(2029, 0, 230), (1300, 1, 15)]


@pytest.mark.parametrize("offset,was,now", MNN_CRASHERS)
def test_one_byte_mnn_change_is_a_backend_error(cnn_mnn, tmp_path, monkeypatch, offset, was, now):
    """Finding 3: MNN trusts its flatbuffer; the probe child crashes instead of the caller."""
    monkeypatch.setenv("LUODI_CACHE_DIR", str(tmp_path / "cache"))
    with zipfile.ZipFile(cnn_mnn) as zf:
        model = bytearray(zf.read("targets/mnn-fp32/model.mnn"))
    assert model[offset] == was, "MNN converted the small CNN differently: find the crashing bytes again"
    model[offset] = now
    bad = tmp_path / "bad.luodi"
    bad.write_bytes(repinned(cnn_mnn.read_bytes(), {"targets/mnn-fp32/model.mnn": bytes(model)}))
    # The same bytes sometimes fail cleanly, sometimes crash (MNN reads what the heap holds): three tries.
    code = """
        import sys, luodi
        for _ in range(3):
            try:
                luodi.Session(sys.argv[1], backend="mnn")
            except luodi.LuodiError as exc:
                print(type(exc).__name__, exc)
    """
    out = assert_survived(in_child(code, tmp_path, str(bad)))
    refusals = out.strip().splitlines()
    assert len(refusals) == 3, out
    # The probe child either dies of a signal, or ends with an error once MNN's stray writes have corrupted its heap
    # (seen: a TypeError from a json call, exit status 1), or MNN refuses the file cleanly: a BackendError each time.
    malformed = (
        "the mnn-fp32 engine file is malformed: mnn crashed",
        "the mnn-fp32 engine file is malformed: mnn exited",
    )
    for line in refusals:
        clean = line.startswith("CompileError mnn could not load mnn-fp32")
        assert clean or line.startswith(tuple(f"BackendError {m}" for m in malformed)), line


def test_trusted_packages_skip_the_probe_and_encrypted_ones_stay_off_disk(tmp_path, monkeypatch):
    if not installed("ncnn"):
        pytest.skip("ncnn is not installed (make test installs every engine)")
    from luodi.package import crypto, signing

    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("LUODI_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(scratch))  # the probe child's temp folder: must stay empty
    plain = tmp_path / "cnn.luodi"
    luodi.compile(small_cnn(), plain, targets=["ncnn"], name="small-cnn", verify=False)
    key, pub = signing.generate_keys(tmp_path / "vendor")
    signed = signing.sign_package(plain, key, tmp_path / "signed.luodi")
    x = {"x": np.ones((1, 3, 16, 16), np.float32)}

    def probed() -> int:
        return len(list((cache / "probed").glob("*"))) if (cache / "probed").is_dir() else 0

    with luodi.Session(signed, backend="ncnn", trust=pub) as s:
        s.run(x)
    assert probed() == 0, "a package checked against a trusted key needs no probe"
    with luodi.Session(signed, backend="ncnn") as s:
        s.run(x)
    assert probed() == 1, "an unchecked package is probed once"
    enc = crypto.encrypt_package(plain, tmp_path / "enc.luodi", passphrase="correct horse")
    with luodi.Session(enc, backend="ncnn", passphrase="correct horse") as s:
        s.run(x)
    assert probed() == 1, "the decrypted files are the same bytes: the verdict is reused"
    monkeypatch.setenv("LUODI_CACHE_DIR", str(tmp_path / "fresh"))
    cache = tmp_path / "fresh"
    with luodi.Session(enc, backend="ncnn", passphrase="correct horse") as s:
        s.run(x)
    assert probed() == 0, "an encrypted package is probed (its bytes through a pipe) but leaves no marker"
    assert list(scratch.iterdir()) == [], "nothing of the decrypted model reached a temporary file"


@pytest.mark.slow
def test_verify_and_auto_survive_a_malformed_ncnn_target(bad_ncnn_effnet, tmp_path, monkeypatch):
    """`luodi verify` and auto-selection load every target: the crashing one is reported, the others still work."""
    monkeypatch.setenv("LUODI_CACHE_DIR", str(tmp_path / "cache"))
    verify = subprocess.run(
        [sys.executable, "-m", "luodi", "verify", str(bad_ncnn_effnet)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert verify.returncode >= 0, f"luodi verify died of signal {-verify.returncode}"
    assert "ncnn-fp32 engine file is malformed" in verify.stdout + verify.stderr
    assert "mnn:fp32" in verify.stdout
    code = """
        import sys, numpy as np, luodi
        with luodi.Session(sys.argv[1]) as s:
            s.run({"images": np.ones((1, 3, 224, 224), np.float32)})
            print(s.backend, "|", s.selection)
    """
    out = assert_survived(in_child(code, tmp_path, str(bad_ncnn_effnet)))
    assert out.startswith("mnn |") and "ncnn:fp32: could not be loaded to time it" in out
