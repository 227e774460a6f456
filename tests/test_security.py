"""Signed packages, encrypted packages decrypted in memory only, and licences: real keys, real engines, real files."""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import luodi
from conftest import installed, small_cnn
from luodi.package import crypto, license, signing

pytest.importorskip("cryptography")

BACKENDS = [b for b in ("onnxruntime", "reference", "openvino", "ncnn", "mnn") if installed(b)]
X = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)


def luodi_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "luodi", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A vendor key pair, a stranger's key pair, a plain package on every installed engine, and its outputs."""
    d = tmp_path_factory.mktemp("sec")
    vendor, vendor_pub = signing.generate_keys(d / "vendor")
    other, other_pub = signing.generate_keys(d / "other")
    plain = d / "cnn.luodi"
    luodi.compile(small_cnn(), plain, targets=BACKENDS, name="small-cnn", verify=False)
    with luodi.Session(plain, backend="onnxruntime") as s:
        expected = s.run({"x": X})["y"]
    signed = signing.sign_package(plain, vendor, d / "signed.luodi")
    lic = d / "acme.lic"
    license.issue_license(vendor, "ACME", "2099-12-31", ["small-cnn"], output=lic)
    return {
        "dir": d,
        "vendor": vendor,
        "vendor_pub": vendor_pub,
        "other": other,
        "other_pub": other_pub,
        "plain": plain,
        "signed": signed,
        "licence": lic,
        "expected": expected,
    }


def rewrite(src: Path, dest: Path, change: dict[str, bytes]) -> Path:
    """A well-formed zip with members replaced: what someone altering a package on purpose writes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change.get(info.filename, zin.read(info.filename)))
    return dest


def flip(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


# -- 1. signing --------------------------------------------------------------------------------------
def test_signed_package_runs_under_its_key_and_only_its_key(sec):
    with luodi.Session(sec["signed"], backend="onnxruntime", trust=sec["vendor_pub"]) as s:
        np.testing.assert_array_equal(s.run({"x": X})["y"], sec["expected"])
    # trust as raw key bytes works the same
    with luodi.Session(sec["signed"], backend="onnxruntime", trust=signing.raw_public(sec["vendor_pub"])):
        pass
    with pytest.raises(luodi.IntegrityError, match="does not match manifest.json under the trusted key"):
        luodi.Session(sec["signed"], trust=sec["other_pub"])
    with pytest.raises(luodi.IntegrityError, match="is not signed"):
        luodi.Session(sec["plain"], trust=sec["vendor_pub"])
    # without trust=, signed and unsigned packages both load
    for pkg in (sec["plain"], sec["signed"]):
        with luodi.Session(pkg, backend="onnxruntime") as s:
            np.testing.assert_array_equal(s.run({"x": X})["y"], sec["expected"])
    manifest = luodi.Package(sec["signed"]).manifest
    assert manifest["signer"] == {"algorithm": "ed25519", "key": signing.fingerprint(sec["vendor_pub"])}


@pytest.mark.parametrize("kind", ["signed", "encrypted and signed"])
def test_one_flipped_byte_anywhere_is_an_integrity_error(sec, encrypted, kind, tmp_path):
    """Every member, the manifest and the signature: one flipped byte, rewritten as a valid zip, is refused."""
    package = sec["signed"] if kind == "signed" else encrypted["licence"]
    keys = {"license": sec["licence"]} if kind != "signed" else {}
    with zipfile.ZipFile(package) as zf:
        members = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    assert signing.SIGNATURE in members and "manifest.json" in members and len(members) >= 2 + len(BACKENDS)
    for name, data in members.items():
        for at in (0, len(data) // 2, len(data) - 1):
            bad = rewrite(package, tmp_path / "bad.luodi", {name: flip(data, at)})
            with pytest.raises(luodi.IntegrityError) as caught:
                luodi.Session(bad, backend="reference", trust=sec["vendor_pub"], **keys)
            where = "signature" if name in ("manifest.json", signing.SIGNATURE) else f"member '{name}'"
            assert where in str(caught.value), (name, str(caught.value))


def test_raw_byte_flips_in_the_file_are_integrity_errors(sec, tmp_path):
    """Flipping a byte of a member's stored data in the file itself (the zip's CRC then fails too)."""
    raw = sec["signed"].read_bytes()
    with zipfile.ZipFile(sec["signed"]) as zf:
        infos = zf.infolist()
    for info in infos:
        # the local header is 30 bytes plus the name and extra field; the data follows it
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        bad = tmp_path / "raw.luodi"
        bad.write_bytes(flip(raw, start + info.compress_size // 2))
        with pytest.raises(luodi.IntegrityError):
            luodi.Session(bad, backend="reference", trust=sec["vendor_pub"])


def test_keys_gen_and_compile_sign_with_the_cli(tmp_path, cnn_model):
    r = luodi_cli("keys", "gen", "-o", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600 and (tmp_path / "k.pub").exists()
    r = luodi_cli("keys", "gen", "-o", str(tmp_path / "k"))
    assert r.returncode == 2 and "exists" in r.stderr
    model = tmp_path / "cnn.onnx"
    model.write_bytes(cnn_model.SerializeToString())
    out = tmp_path / "cnn.luodi"
    r = luodi_cli("compile", str(model), "-o", str(out), "--no-verify", "--sign", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    signing.verify_package(out, tmp_path / "k.pub")
    assert luodi.Package(out).name == "cnn"  # the model name defaults to the source file's stem


# -- 2. encryption -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encrypted(sec) -> dict:
    d = sec["dir"]
    return {
        "licence": crypto.encrypt_package(
            sec["plain"], d / "enc-lic.luodi", license=sec["licence"], sign=sec["vendor"]
        ),
        "passphrase": crypto.encrypt_package(sec["plain"], d / "enc-pass.luodi", passphrase="correct horse"),
    }


def plaintext_chunks(package: Path) -> list[bytes]:
    """32-byte pieces from the middle of every member of a plain package: what must never leave memory."""
    pkg = luodi.Package(package)
    out = []
    for name in pkg.manifest["files"]:
        data = pkg.read(name)
        if len(data) >= 64 and not name.endswith(".json"):
            out.append(data[len(data) // 2 : len(data) // 2 + 32])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_encrypted_package_runs_on_every_in_memory_engine(sec, encrypted, backend):
    with luodi.Session(encrypted["licence"], backend=backend, license=sec["licence"], trust=sec["vendor_pub"]) as s:
        np.testing.assert_allclose(s.run({"x": X})["y"], sec["expected"], rtol=1e-4, atol=1e-4)
        assert s.license.licensee == "ACME"
    with luodi.Session(encrypted["passphrase"], backend=backend, passphrase="correct horse") as s:
        np.testing.assert_allclose(s.run({"x": X})["y"], sec["expected"], rtol=1e-4, atol=1e-4)


def test_verify_unlocks_an_encrypted_package_with_its_licence_or_passphrase(sec, encrypted):
    r = luodi_cli("verify", str(encrypted["licence"]))
    assert r.returncode == 2 and "--license FILE" in r.stderr  # says which key opens it
    for args, env in (
        (("--license", str(sec["licence"]), "--trust", str(sec["vendor_pub"])), {}),
        ((), {"LUODI_PASSPHRASE": "correct horse"}),
    ):
        package = encrypted["licence"] if args else encrypted["passphrase"]
        r = luodi_cli("verify", str(package), "-t", "onnxruntime", "--layerwise", *args, **env)
        assert r.returncode == 0, r.stderr
        assert "onnxruntime:fp32" in r.stdout and "layer-wise" in r.stdout
    r = luodi_cli(
        "verify", str(encrypted["licence"]), "--license", str(sec["licence"]), "--trust", str(sec["other_pub"])
    )
    assert r.returncode == 2 and "signature" in r.stderr.lower()


def test_encrypted_members_hold_no_plaintext_and_need_the_key(sec, encrypted):
    chunks = plaintext_chunks(sec["plain"])
    for path in encrypted.values():
        with zipfile.ZipFile(path) as zf:
            stored = b"".join(zf.read(n) for n in zf.namelist())
        assert chunks and not any(c in stored for c in chunks)
    opened = luodi.Package(encrypted["passphrase"])
    crypto.unlock(opened, passphrase="correct horse")
    decrypted = b"".join(opened.read(n) for n in opened.manifest["files"] if n != crypto.CHECK)
    assert all(c in decrypted for c in chunks)  # the same search finds them once decrypted
    with pytest.raises(luodi.KeyRequiredError, match="passphrase"):
        luodi.Session(encrypted["passphrase"])
    with pytest.raises(luodi.KeyRequiredError, match="license"):
        luodi.Session(encrypted["licence"])
    with pytest.raises(luodi.KeyRequiredError, match="passphrase is wrong"):
        luodi.Session(encrypted["passphrase"], passphrase="wrong horse")
    with pytest.raises(luodi.KeyRequiredError):
        luodi.Package(encrypted["passphrase"]).model()
    # a licence from another vendor key: its signature does not match the key the package names
    stranger = license.issue_license(sec["other"], "ACME", "2099-12-31", ["small-cnn"])
    body = {**stranger.body, "signature": signing.b64(stranger.signature)}
    with pytest.raises(luodi.LicenseSignatureError, match="accepts only licences of vendor key"):
        luodi.Session(encrypted["licence"], license=json.dumps(body))


def test_altered_encrypted_package_fails_authentication(sec, encrypted, tmp_path):
    """Without trust=, AES-GCM alone catches an altered member, a member moved in, and an altered manifest."""
    src = encrypted["passphrase"]
    pkg = luodi.Package(src)
    name = pkg.find_target("onnxruntime")["files"]["model.onnx"]
    stored = pkg.read_stored(name)
    # an altered member, re-pinned in the manifest so that only the cipher can notice
    tampered = flip(stored)
    manifest = dict(pkg.manifest)
    manifest["files"] = {
        **manifest["files"],
        name: {"sha256": luodi.package.archive.sha256(tampered), "size": len(tampered)},
    }
    bad = rewrite(src, tmp_path / "a.luodi", {name: tampered, "manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(luodi.IntegrityError, match=f"member '{name}' fails authentication"):
        luodi.Session(bad, backend="onnxruntime", passphrase="correct horse")
    # a changed manifest (another model name): the check member no longer authenticates
    manifest = {**pkg.manifest, "name": "renamed"}
    bad = rewrite(src, tmp_path / "b.luodi", {"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(luodi.IntegrityError, match="encryption.check"):
        luodi.Session(bad, backend="onnxruntime", passphrase="correct horse")


@pytest.mark.slow
def test_encrypt_and_license_commands(sec, tmp_path):
    fp = luodi_cli("license", "fingerprint")
    assert fp.returncode == 0 and fp.stdout.strip() == license.machine_fingerprint()
    lic = tmp_path / "bound.lic"
    r = luodi_cli(
        "license",
        "issue",
        "--key",
        str(sec["vendor"]),
        "--licensee",
        "ACME Robotics",
        "--expires",
        "2099-01-31",
        "--models",
        "small-cnn,other",
        "--bind-machine",
        fp.stdout.strip(),
        "--max-sessions",
        "2",
        "-o",
        str(lic),
    )
    assert r.returncode == 0, r.stderr
    r = luodi_cli("license", "inspect", str(lic), "--model", "small-cnn")
    assert r.returncode == 0, r.stderr
    assert "ACME Robotics" in r.stdout and "2099-01-31" in r.stdout
    signature = next(line for line in r.stdout.splitlines() if "signature" in line)
    assert "valid (by the issuer key it names)" in signature and "invalid" not in signature, r.stdout
    assert "ok: this licence lets 'small-cnn' run on this machine today" in r.stdout, r.stdout
    r = luodi_cli("license", "inspect", str(lic), "--model", "nope")
    assert r.returncode == 2 and "not 'nope'" in r.stderr
    out = tmp_path / "enc.luodi"
    r = luodi_cli("encrypt", str(sec["plain"]), "-o", str(out), "--license", str(lic))
    assert r.returncode == 0, r.stderr
    r = luodi_cli("info", str(out))
    assert (
        r.returncode == 0 and f"opens with a licence of vendor key {signing.fingerprint(sec['vendor_pub'])}" in r.stdout
    )
    with luodi.Session(out, backend="onnxruntime", license=lic) as s:
        np.testing.assert_array_equal(s.run({"x": X})["y"], sec["expected"])
    out = tmp_path / "pass.luodi"
    r = luodi_cli("encrypt", str(sec["plain"]), "-o", str(out), "--passphrase", LUODI_PASSPHRASE="s3cret")
    assert r.returncode == 0, r.stderr
    with luodi.Session(out, backend="onnxruntime", passphrase="s3cret"):
        pass
    r = luodi_cli("encrypt", str(sec["plain"]), "-o", str(tmp_path / "x.luodi"))
    assert r.returncode == 2 and "exactly one of" in r.stderr


# -- 3. licences -------------------------------------------------------------------------------------
def test_each_licence_failure_has_its_own_error(sec, encrypted, tmp_path):
    def issue(expires: str = "2099-12-31", models: tuple[str, ...] = ("small-cnn",), **kw) -> Path:
        out = tmp_path / f"l{len(list(tmp_path.iterdir()))}.lic"
        license.issue_license(sec["vendor"], "ACME", expires, list(models), output=out, **kw)
        return out

    pkg = encrypted["licence"]
    yesterday = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    cases = [
        (issue(expires=yesterday), luodi.LicenseExpiredError, "expired"),
        (issue(models=("another-model",)), luodi.LicenseModelError, "model"),
        (issue(machine="0" * 32), luodi.LicenseMachineError, "machine"),
    ]
    for lic, error, reason in cases:
        with pytest.raises(error) as caught:
            luodi.Session(pkg, backend="onnxruntime", license=lic)
        assert caught.value.reason == reason and isinstance(caught.value, luodi.LicenseError)
    # today is still inside the licence; this machine's binding passes
    ok = issue(expires=dt.datetime.now(dt.timezone.utc).date().isoformat(), machine=license.machine_fingerprint())
    with luodi.Session(pkg, backend="onnxruntime", license=ok):
        pass
    # an altered licence (a later expiry written in by hand) fails its signature
    body = json.loads(sec["licence"].read_text())
    body["expires"] = "2199-12-31"
    forged = tmp_path / "forged.lic"
    forged.write_text(json.dumps(body))
    with pytest.raises(luodi.LicenseSignatureError, match="altered"):
        luodi.Session(pkg, backend="onnxruntime", license=forged)
    with pytest.raises(luodi.LicenseError, match="not a luodi licence"):
        luodi.Session(pkg, backend="onnxruntime", license=b"garbage")


def test_max_sessions_counts_open_sessions_in_this_process(sec, encrypted, tmp_path):
    lic = tmp_path / "two.lic"
    license.issue_license(sec["vendor"], "ACME", "2099-12-31", ["small-cnn"], max_sessions=2, output=lic)
    first = luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic)
    second = luodi.Session(encrypted["licence"], backend="reference", license=lic)
    with pytest.raises(luodi.LicenseSessionsError, match="2 open session"):
        luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic)
    first.close()
    with luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic):
        pass
    third = luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic)
    with pytest.raises(luodi.LicenseSessionsError):
        luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic)
    del third  # a session dropped without close() gives its place back when collected
    gc.collect()
    with luodi.Session(encrypted["licence"], backend="onnxruntime", license=lic):
        pass
    second.close()


# -- no plaintext on disk ----------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import os, sys, tempfile
    tempfile.tempdir = os.environ["TMPDIR"]  # skip Python's own probe file; every temp file still goes there
    import luodi, numpy as np
    pkg, backend, key = sys.argv[1:4]
    kw = {"passphrase": key} if key.startswith("pass:") else ({"license": key} if key else {})
    if "passphrase" in kw:
        kw["passphrase"] = key[5:]
    s = luodi.Session(pkg, backend=backend, **kw)
    s.run({s.inputs[0].name: np.ones((1, 3, 16, 16), np.float32)})
    print("ready", flush=True)
    sys.stdin.readline()
    s.close()
    """
)

_IN_CREATE, _IN_MOVED_TO, _IN_NONBLOCK = 0x100, 0x80, 0o4000


class Inotify:
    """Every name created in the watched folders, even one deleted a moment later (kernel-queued events)."""

    def __init__(self, folders: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(_IN_NONBLOCK)
        assert self.fd >= 0
        for f in folders:
            assert self.libc.inotify_add_watch(self.fd, str(f).encode(), _IN_CREATE | _IN_MOVED_TO) >= 0

    def created(self) -> list[str]:
        names = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            i = 0
            while i < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, i)
                names.append(buf[i + 16 : i + 16 + length].rstrip(b"\0").decode())
                i += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def run_watched(package: Path, backend: str, key: str, chunks: list[bytes], root: Path) -> dict:
    """Load ``package`` in a child whose TMPDIR, cwd and cache are fresh watched folders; report what touched them."""
    tmp, cwd, cache = root / "tmp", root / "cwd", root / "cache"
    for f in (tmp, cwd, cache):
        f.mkdir(parents=True)
    watch = Inotify([tmp, cwd, cache])
    env = {**os.environ, "TMPDIR": str(tmp), "LUODI_CACHE_DIR": str(cache)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(package), backend, key],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    leaks: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            # the child's open files while it loads and runs: none may hold the plaintext
            for link in Path(f"/proc/{child.pid}/fd").glob("*"):
                try:
                    target = os.readlink(link)
                    on_disk = target.startswith("/") and not target.startswith(("/dev/", "/proc/", "/memfd:"))
                    if on_disk and os.path.isfile(link) and any(c in Path(link).read_bytes() for c in chunks):
                        leaks.append(target)
                except OSError:  # closed meanwhile
                    pass
            if child.stdout.readable() and _ready(child):
                break
            time.sleep(0.01)
        assert child.poll() is None, child.stderr.read()
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    created = watch.created()
    watch.close()
    for f in (tmp, cwd, cache):
        for p in f.rglob("*"):
            if p.is_file() and any(c in p.read_bytes() for c in chunks):
                leaks.append(str(p))
    return {"created": created, "leaks": leaks, "tmp_left": list(tmp.iterdir())}


def _ready(child: subprocess.Popen) -> bool:
    import select

    if select.select([child.stdout], [], [], 0)[0]:
        return child.stdout.readline().strip() == "ready"
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_plaintext_reaches_disk(sec, encrypted, backend, tmp_path):
    chunks = plaintext_chunks(sec["plain"])
    seen = run_watched(encrypted["licence"], backend, str(sec["licence"]), chunks, tmp_path / "enc")
    assert seen["leaks"] == []
    assert [p.name for p in seen["tmp_left"] if p.name != ".ses"] == []
    # No file at all is created in TMPDIR, the working folder or the cache, not even one deleted at once,
    # except onnxruntime's own 51-byte session stamp (".ses", written when it is imported; scanned above).
    assert [n for n in seen["created"] if n != ".ses"] == []


@pytest.mark.skipif("ncnn" not in BACKENDS, reason="ncnn is not installed")
def test_the_watch_sees_a_plain_package_written_to_a_temp_file(sec, tmp_path):
    """The same watch on a plain package: ncnn loads it from temporary files, and the watch sees them."""
    chunks = plaintext_chunks(sec["plain"])
    seen = run_watched(sec["plain"], "ncnn", "", chunks, tmp_path / "plain")
    assert any(n.startswith("luodi-ncnn-") for n in seen["created"]), seen


@pytest.mark.skipif(not installed("torch"), reason="torch is not installed")
@pytest.mark.slow
def test_no_plaintext_reaches_disk_on_torch(tmp_path):
    """torch.export.load from a buffer; torch itself only makes an empty torchinductor_<user> folder in TMPDIR."""
    import torch

    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 5)
    ).eval()
    plain = tmp_path / "tiny.luodi"
    luodi.export(module, (torch.zeros(1, 3, 16, 16),), plain, ["torch"], name="tiny")
    enc = crypto.encrypt_package(plain, tmp_path / "tiny-enc.luodi", passphrase="pw")
    chunks = plaintext_chunks(plain)
    seen = run_watched(enc, "torch", "pass:pw", chunks, tmp_path / "watch")
    assert seen["leaks"] == []
    assert [n for n in seen["created"] if not n.startswith("torchinductor_")] == []
    assert all(p.is_dir() and not any(p.iterdir()) for p in seen["tmp_left"])


def test_encrypted_efficientnet_predicts_like_the_plain_one(effnet_package, sec, tmp_path):
    """The real model and its pipeline, encrypted for a licence: the same classes, the same scores."""
    from luodi.zoo.images import skimage_picture

    name = luodi.Package(effnet_package).name
    lic = tmp_path / "effnet.lic"
    license.issue_license(sec["vendor"], "ACME", "2099-12-31", [name], output=lic)
    enc = crypto.encrypt_package(effnet_package, tmp_path / "effnet-enc.luodi", license=lic, sign=sec["vendor"])
    picture = skimage_picture("chelsea")
    with luodi.Session(effnet_package, backend="onnxruntime") as plain:
        want = plain.predict(picture, k=3)
    with luodi.Session(enc, backend="onnxruntime", license=lic, trust=sec["vendor_pub"]) as s:
        got = s.predict(picture, k=3)
    assert [p.index for p in got] == [p.index for p in want]
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=1e-5)


def test_a_backend_that_loads_only_from_files_is_refused_for_encrypted_packages(sec, encrypted, monkeypatch):
    """A plugin engine that cannot load from memory (Backend.in_memory False) must not get decrypted files."""
    backend = type(luodi.get_backend("reference"))
    monkeypatch.setattr(backend, "in_memory", False)
    with pytest.raises(luodi.PackageError, match="can only load a model from a file"):
        luodi.Session(encrypted["passphrase"], backend="reference", passphrase="correct horse")
    with luodi.Session(sec["plain"], backend="reference") as s:  # a plain package still loads on it
        s.run({"x": X})


def test_licence_for_a_plain_package_and_inspect_of_a_forged_one(sec, tmp_path):
    expired = tmp_path / "old.lic"
    license.issue_license(sec["vendor"], "ACME", "2020-01-01", ["small-cnn"], output=expired)
    with pytest.raises(luodi.LicenseExpiredError):
        luodi.Session(sec["plain"], backend="onnxruntime", license=expired)
    with luodi.Session(sec["plain"], backend="onnxruntime", license=sec["licence"]) as s:
        assert s.license.licensee == "ACME"
    body = json.loads(sec["licence"].read_text())
    body["licensee"] = "Someone Else"
    forged = tmp_path / "forged.lic"
    forged.write_text(json.dumps(body))
    r = luodi_cli("license", "inspect", str(forged))
    assert r.returncode == 2 and "altered" in r.stderr and "Traceback" not in r.stderr
