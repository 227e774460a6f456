"""Packages crafted by an attacker: a pickled torch weight, external data outside the package, a zip bomb behind a
signature, a scrypt cost meant to exhaust memory, escapes in the manifest, an endless licence. Each is refused with a
LuodiError (or shown escaped) and runs nothing."""

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
from conftest import installed, small_cnn


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


@pytest.mark.slow
def test_a_pickled_torch_weight_runs_nothing_in_info_and_verify(torch_pkg, tmp_path):
    marker = tmp_path / "pwned"
    bad = _hostile_package(torch_pkg, tmp_path / "bad.luodi", marker)
    info = luodi_cli("info", str(bad))
    assert info.returncode == 0, info.stderr
    verify = luodi_cli("verify", str(bad))
    assert "Traceback" not in verify.stderr
    assert "refused" in verify.stdout + verify.stderr
    assert not marker.exists(), "the package's pickle ran"


@pytest.mark.slow
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


# -- finding 6: a zip bomb behind a signature ----------------------------------------------------------------------

_CHILD_RSS = """
import resource, sys
import luodi
from luodi.package import crypto, signing
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    {call}
    print("OPENED")
except luodi.LuodiError as exc:
    print("REFUSED", type(exc).__name__, str(exc).replace("\\n", " "))
except BaseException as exc:
    print("ESCAPED", type(exc).__name__, str(exc)[:300].replace("\\n", " "))
print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def run_child(call: str, limit_bytes: int | None = None) -> tuple[str, float]:
    """Run ``call`` in a fresh interpreter (optionally under an address-space limit); its verdict and RSS growth."""
    code = _CHILD_RSS.format(call=call)
    if limit_bytes is not None:
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n" + code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    growth = float(lines[-1].split()[1]) if lines and lines[-1].startswith("GROWTH_MB") else float("inf")
    return (lines[0] if lines else done.stderr[-500:]), growth


def bomb_zip(src: Path, dest: Path, member: str, inflated: int) -> Path:
    """``src`` with ``member`` replaced by ``inflated`` zero bytes, deflated (about 1000x smaller on disk)."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info.filename))
                continue
            info = zipfile.ZipInfo(member)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(info, "w", force_zip64=True) as fh:
                for _ in range(inflated // len(chunk)):
                    fh.write(chunk)
    return dest


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("cryptography")
    from luodi.package import signing

    d = tmp_path_factory.mktemp("signed")
    key, pub = signing.generate_keys(d / "vendor")
    plain = d / "cnn.luodi"
    luodi.compile(small_cnn(), plain, targets=["onnxruntime"], name="small-cnn", verify=False)
    return {"dir": d, "key": key, "pub": pub, "plain": plain, "signed": signing.sign_package(plain, key, d / "s.luodi")}


@pytest.mark.parametrize("member", ["model.onnx", "manifest.json", "signature.ed25519"])
def test_a_bomb_in_a_signed_package_is_refused_before_it_inflates(signed, tmp_path, member):
    bomb = bomb_zip(signed["signed"], tmp_path / "bomb.luodi", member, 600 << 20)
    assert bomb.stat().st_size < 3 << 20
    verdict, growth = run_child(f"luodi.Session({str(bomb)!r}, trust={str(signed['pub'])!r})")
    assert verdict.startswith("REFUSED"), verdict
    assert member in verdict
    assert growth < 300, f"opening a {bomb.stat().st_size >> 10} KB bomb grew RSS by {growth:.0f} MB"


# -- finding 7: the scrypt cost comes from the manifest --------------------------------------------------------------


def test_a_hostile_scrypt_cost_is_refused_before_deriving(signed, tmp_path):
    from luodi.package import crypto

    enc = crypto.encrypt_package(signed["plain"], tmp_path / "enc.luodi", passphrase="right")
    with luodi.Session(enc, passphrase="right", backend="onnxruntime") as s:  # the default cost opens
        assert s.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 5)
    for field, value, says in (("n", 2**22, "unlock.n"), ("r", 4096, "unlock.r"), ("p", 2**20, "unlock.p")):
        m = json.loads(zipfile.ZipFile(enc).read("manifest.json"))
        m["encryption"]["unlock"][field] = value
        bad = repin(enc, tmp_path / f"{field}.luodi", {}, manifest=m)
        t0 = time.perf_counter()
        # Under a 1.5 GB address-space limit, so that a luodi that derives first fails fast instead of taking 4 GB.
        verdict, growth = run_child(f"luodi.Session({str(bad)!r}, passphrase='wrong')", limit_bytes=3 << 29)
        assert verdict.startswith("REFUSED PackageError"), verdict
        assert says in verdict
        assert time.perf_counter() - t0 < 30
        assert growth < 100
    m = json.loads(zipfile.ZipFile(enc).read("manifest.json"))
    m["encryption"]["unlock"].update(n=2**20, r=8)  # each within its own bound, 1 GiB together
    with pytest.raises(luodi.PackageError, match="MiB"):
        luodi.Session(repin(enc, tmp_path / "mem.luodi", {}, manifest=m), passphrase="wrong")


# -- finding 5: external data outside the package ------------------------------------------------------------------

SECRET = b"SECRETSECRETSECR"


def external_model(location: str = "secret.txt"):
    """y = x + w, where w (4 floats) is ONNX external data at ``location``."""
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("backend", [b for b in ("openvino", "onnxruntime", "reference") if installed(b)])
def test_external_data_is_never_read_from_the_working_directory_at_compile(backend, tmp_path, monkeypatch):
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "models"
    cwd.mkdir(), elsewhere.mkdir()
    (cwd / "secret.txt").write_bytes(SECRET)
    (elsewhere / "m.onnx").write_bytes(external_model().SerializeToString())
    monkeypatch.chdir(cwd)
    for source in (external_model(), external_model().SerializeToString(), elsewhere / "m.onnx"):
        with pytest.raises(luodi.ModelError, match="secret.txt"):
            luodi.compile(source, tmp_path / "out.luodi", targets=[backend], verify=False)
    assert not (tmp_path / "out.luodi").exists()
    (elsewhere / "secret.txt").write_bytes(bytes(16))  # beside the model file: its own external data, read in
    pkg = luodi.compile(elsewhere / "m.onnx", tmp_path / "out.luodi", targets=[backend], verify=False)
    with luodi.Session(pkg.path, backend=backend) as s:
        assert s.run({"x": np.ones(4, np.float32)})["y"].tolist() == [1.0] * 4


@pytest.mark.parametrize("backend", [b for b in ("onnxruntime", "reference") if installed(b)])
def test_external_data_is_never_read_from_the_working_directory_at_run_time(backend, tmp_path, monkeypatch):
    from onnx import TensorProto

    good_model = external_model()
    w = good_model.graph.initializer[0]
    del w.external_data[:]
    w.data_location = TensorProto.DEFAULT
    w.raw_data = bytes(16)
    good = luodi.compile(good_model, tmp_path / "good.luodi", targets=[backend], verify=False)
    member = good.find_target(backend)["files"]["model.onnx"]
    hostile = external_model().SerializeToString()
    bad = repin(good.path, tmp_path / "bad.luodi", {member: hostile, "model.onnx": hostile})
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(luodi.ModelError, match="external data"), luodi.Session(bad, backend=backend) as s:
        leaked = s.run({"x": np.zeros(4, np.float32)})["y"]
        assert leaked.tobytes() != SECRET, "a file of the working directory came back as an output"


# -- finding 12: what a package says is shown, never obeyed ----------------------------------------------------------

HOSTILE_TEXT = "\x1b[2J\x1b[Hcleared\rFAKE: verified\x9b31m [bold red]markup[/] \u202eevil"


def test_info_escapes_control_characters_and_markup_from_the_manifest(signed, tmp_path):
    m = json.loads(zipfile.ZipFile(signed["plain"]).read("manifest.json"))
    m["name"] = "cnn" + HOSTILE_TEXT
    m["description"] = HOSTILE_TEXT
    m["version"] = HOSTILE_TEXT
    m["created"] = HOSTILE_TEXT
    m["targets"][0]["verification"] = {"error": HOSTILE_TEXT}
    bad = repin(signed["plain"], tmp_path / "bad.luodi", {}, manifest=m)
    shown = luodi_cli("info", str(bad))
    assert shown.returncode == 0, shown.stderr
    for raw in ("\x1b", "\r", "\x9b", "\u202e"):
        assert raw not in shown.stdout, f"{raw!r} reached the terminal"
    assert "\\x1b[2J" in shown.stdout and "\\r" in shown.stdout  # shown as escapes, not dropped
    assert "[bold red]markup[/]" in shown.stdout  # markup shown literally
    from luodi.cli.safe import plain, text

    assert text("a[b]c\x07") == "a\\[b]c\\x07" and plain("ok\u2028") == "ok\\u2028"


def test_a_licence_path_is_read_bounded(tmp_path):
    pytest.importorskip("cryptography")
    from luodi.package.license import License

    deep = tmp_path / "deep.lic"
    deep.write_text("[" * 200_000)
    for source in ("/dev/zero", deep):
        with pytest.raises(luodi.LicenseError, match="over|not JSON"):
            License.load(source)


def test_damaged_pt2_archives_are_model_errors_never_a_crash_or_code(torch_pkg, tmp_path):
    """300 byte flips of a real program: each is refused by the check or by torch, always as a LuodiError."""
    import torch

    from luodi.backends.torch import _load_program

    pkg = luodi.Package(torch_pkg)
    program = pkg.read(pkg.find_target("torch")["files"]["model.pt2"])
    rng = np.random.default_rng(14)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(program)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        try:
            _load_program(torch, bytes(data))
            outcomes["loaded"] += 1
        except luodi.LuodiError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_pt2_archive_headers_zipfile_cannot_read_are_model_errors(torch_pkg):
    """Header fields zipfile refuses with NotImplementedError or RuntimeError (seen in CI from a random flip)."""
    import struct

    import torch

    from luodi.backends.torch import _load_program

    pkg = luodi.Package(torch_pkg)
    program = pkg.read(pkg.find_target("torch")["files"]["model.pt2"])
    end = program.rindex(b"PK\x05\x06")  # the end record says where the central directory starts
    (central,) = struct.unpack_from("<L", program, end + 16)  # (the sample inputs are a zip inside: not index())
    assert program[central : central + 4] == b"PK\x01\x02"
    edits = {
        "an extract version past 6.3": (central + 6, bytes([142])),
        "an unknown compression method": (central + 10, struct.pack("<H", 99)),
        "the encrypted flag": (central + 8, struct.pack("<H", 1)),
    }
    for what, (at, value) in edits.items():
        data = bytearray(program)
        data[at : at + len(value)] = value
        with pytest.raises(luodi.ModelError):  # by luodi's check, or by torch's reader (a flag zipfile ignores)
            _load_program(torch, bytes(data))
        print(what, "refused")
