"""Packages crafted by an attacker: a pickled torch weight, external data outside the package, a zip bomb behind a
signature, a scrypt cost meant to exhaust memory. Each is refused with a LuodiError and runs nothing."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import luodi
from conftest import installed

HERE = Path(__file__).parent


def luodi_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def repin(src: Path, dest: Path, change: dict[str, bytes], manifest: dict | None = None) -> Path:
    """``src`` with members replaced and the manifest re-pinned to them: an unsigned package an attacker wrote."""
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    m = manifest if manifest is not None else json.loads(members["manifest.json"])
    for name, data in change.items():
        members[name] = data
        if name in m["files"]:
            m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    members["manifest.json"] = json.dumps(m).encode()
    with zipfile.ZipFile(dest, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dest


# -- finding 1: a .pt2 whose weight is a pickle --------------------------------------------------------------------


class _Payload:
    """Pickles to a call of open(marker, "w"): creating the marker file proves the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pt2(program: bytes, marker: Path, where: str = "weight") -> bytes:
    """A valid torch.export archive with one weight (or the sample inputs) replaced by a pickle that opens ``marker``.

    This is what an attacker writes: ``use_pickle`` set in the weights config makes torch call
    ``torch.load(weights_only=False)`` on that member, and the legacy loader unpickles its first object at once.
    """
    evil = pickle.dumps(_Payload(marker), protocol=2)
    zin = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    config_name = "archive/data/weights/model_weights_config.json"
    config = json.loads(zin.read(config_name))
    first = next(iter(config["config"]))
    target = "/" + config["config"][first]["path_name"] if where == "weight" else "sample_inputs/model.pt"
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if where == "weight" and info.filename == config_name:
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith(target):
                data = evil
            zout.writestr(info, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def torch_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    if not installed("torch"):
        pytest.skip("torch backend not available: pip install 'luodi[torch]'")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    module(torch.randn(1, 3, 8, 8))
    out = tmp_path_factory.mktemp("pt2") / "good.luodi"
    luodi.export(module, torch.randn(1, 3, 8, 8), out, targets=["torch"], name="tiny")
    return out


def _hostile_package(good: Path, dest: Path, marker: Path, where: str = "weight") -> Path:
    pkg = luodi.Package(good)
    member = pkg.find_target("torch")["files"]["model.pt2"]
    return repin(good, dest, {member: hostile_pt2(pkg.read(member), marker, where)})


@pytest.mark.parametrize("where", ["weight", "sample_inputs"])
def test_a_pickled_torch_weight_runs_nothing_in_session(torch_pkg, tmp_path, where):
    marker = tmp_path / "pwned"
    bad = _hostile_package(torch_pkg, tmp_path / "bad.luodi", marker, where)
    with pytest.raises(luodi.LuodiError, match="refused|not plain tensors|pickle"):
        luodi.Session(bad)  # backend="auto": the torch target is the only one
    with pytest.raises(luodi.ModelError, match="pickle|not plain tensors"):
        luodi.Session(bad, backend="torch")
    assert not marker.exists(), "the package's pickle ran"
    with luodi.Session(torch_pkg, backend="torch") as s:  # luodi's own export still loads
        assert s.run({"input": np.ones((2, 3, 8, 8), np.float32)})["output"].shape == (2, 5)


def test_a_pickled_torch_weight_runs_nothing_in_info_and_verify(torch_pkg, tmp_path):
    marker = tmp_path / "pwned"
    bad = _hostile_package(torch_pkg, tmp_path / "bad.luodi", marker)
    info = luodi_cli("info", str(bad))
    assert info.returncode == 0, info.stderr
    verify = luodi_cli("verify", str(bad))
    assert "Traceback" not in verify.stderr
    assert "refused" in verify.stdout + verify.stderr
    assert not marker.exists(), "the package's pickle ran"


def test_a_pickled_torch_weight_runs_nothing_in_serve(torch_pkg, tmp_path):
    import httpx

    from serve_helpers import Server

    marker = tmp_path / "pwned"
    repo = tmp_path / "repo"
    repo.mkdir()
    _hostile_package(torch_pkg, repo / "bad.luodi", marker)
    (repo / "good.luodi").write_bytes(torch_pkg.read_bytes())
    server = Server(repo, "--poll-s", "0.2", log=tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                if httpx.get(f"{server.base}/v2/models/good/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        time.sleep(1.0)  # a few more polls of the repository, each of which retried the bad package on main
        assert httpx.get(f"{server.base}/v2/models/bad/ready", timeout=10).status_code != 200
        good = httpx.post(
            f"{server.base}/v2/models/good/infer",
            json={"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [1.0] * 192}]},
            timeout=60,
        )
        assert good.status_code == 200, good.text + server.log()
        assert server.proc.poll() is None, server.log()
        assert "refused" in httpx.get(f"{server.base}/luodi/models", timeout=10).text + server.log()
    finally:
        server.stop()
    assert not marker.exists(), "the package's pickle ran inside the server"


def _archive_with(program: bytes, edit) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return out.getvalue()


def test_other_code_paths_of_a_pt2_are_refused(torch_pkg):
    """Beyond use_pickle, torch.export.load resolves node targets under torch (torch.os.system), sympifies size
    expressions, loads AOTInductor libraries and unpickles custom objects: each is refused before torch reads it."""
    from luodi.backends import _torch_archive

    pkg = luodi.Package(torch_pkg)
    program = pkg.read(pkg.find_target("torch")["files"]["model.pt2"])
    _torch_archive.check(program)

    def model_json(fn):
        def edit(name: str, data: bytes) -> bytes:
            return fn(data.decode()).encode() if name.endswith("models/model.json") else data

        return _archive_with(program, edit)

    cases = {
        "a node calls 'torch.os.system'": model_json(
            lambda s: s.replace('"torch.ops.aten.relu.default"', '"torch.os.system"', 1)
        ),
        "torch.ops.aten.from_file": model_json(
            lambda s: s.replace('"torch.ops.aten.relu.default"', '"torch.ops.aten.from_file.default"', 1)
        ),
        "is not arithmetic": model_json(lambda s: s.replace("Symbol(", "__import__('os').system('true') + Symbol(", 1)),
        "names 'exec'": model_json(lambda s: s.replace("Symbol(", "exec(s0) + Symbol(", 1)),
        "control character": model_json(lambda s: s.replace('"stack_trace": "', '"stack_trace": "\\r', 1)),
    }
    aoti = io.BytesIO(program)
    with zipfile.ZipFile(aoti, "a") as z:
        z.writestr("archive/data/aotinductor/model/model.so", b"\x7fELF")
    cases["does not write for a plain program"] = aoti.getvalue()
    for expected, data in cases.items():
        with pytest.raises(luodi.ModelError, match=expected.replace("(", r"\(").replace(".", r"\.")):
            _torch_archive.check(data)
