"""Bad input never crashes: >= 10,000 mutated packages and inputs, each either works or raises a LuodiError.

Hypothesis mutates a real package (the small CNN compiled for onnxruntime and the reference): bytes (flips,
truncation, overwrites, insertions), zip members (dropped, renamed, replaced and re-pinned, hostile names such as
``../x`` and absolute paths, duplicates, other compression methods), manifest values (huge, negative and non-integer
shapes, wrong types, path traversal member names, deep nesting), and a session's inputs (wrong dtype, NaN/Inf, empty,
huge and wrong shapes, non-contiguous views, non-arrays). Each case opens the package, reads every member, and where
that works starts a Session on onnxruntime and runs it. Zip bombs (a member or manifest.json that would inflate to
128 MiB) are refused before inflating, measured with tracemalloc. Nothing may be written outside the case folder
(the files named by the hostile member names are checked, and the working and temp folders stay empty), and the
process's peak memory may grow by at most 256 MiB over the whole run. Settings: derandomised (the same cases every
run), no example database, no deadline; about 1-2 min on 2 busy cores.

The engines' own files (ncnn param/bin, MNN, OpenVINO IR, torch program, ONNX) are mutated by the fuzz campaign,
``benchmarks/fuzz.py``, which runs every case in a worker process so that an engine crash is counted, not suffered;
``test_engine_artifact_campaign_subset`` runs a seeded share of it (120 cases) and the full campaign is 10,000.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import luodi
from conftest import installed, small_cnn

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

# Examples per test; together >= 10,000 cases. LUODI_FUZZ_SCALE=0.1 runs a tenth, e.g. while editing.
N_BYTES, N_MEMBERS, N_MANIFEST, N_INPUTS = 3500, 2500, 3000, 1500
SCALE = float(os.environ.get("LUODI_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


ESCAPE = "luodi-fuzz-escape"
HOSTILE_NAMES = [
    f"../{ESCAPE}",
    f"../../{ESCAPE}",
    f"targets/../../{ESCAPE}",
    f"/tmp/{ESCAPE}-abs",
    f"..\\{ESCAPE}",
    f"C:\\{ESCAPE}",
    "targets/onnxruntime-fp32/../../../x",
    "a/./b",
    "",
    "\x00",
    "é/model.onnx",
    "x" * 600,
    "manifest.json",
    "model.onnx",
]
HUGE = [2**31, 2**40, 10**12, 2**63, -1, -(2**40)]
hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_NAMES),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The one folder cases are written to, and a cwd and TMPDIR that must stay empty."""
    root = tmp_path_factory.mktemp("fuzz")
    cases, cwd, tmp = root / "cases", root / "cwd", root / "tmp"
    for d in (cases, cwd, tmp):
        d.mkdir()
    for engine in ("onnxruntime", "openvino", "ncnn", "mnn", "torch"):
        installed(engine)  # imported first: an engine library's own memory (torch: ~300 MiB) is not the cases' growth
    old_cwd, old_tmp = os.getcwd(), tempfile.tempdir
    os.chdir(cwd)
    tempfile.tempdir = str(tmp)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield cases
    os.chdir(old_cwd)
    tempfile.tempdir = old_tmp
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib <= 256, f"peak memory grew by {grown_mib:.0f} MiB during the fuzz run"
    assert sorted(p.name for p in root.iterdir()) == ["cases", "cwd", "tmp"]
    # torch makes an empty torchinductor_<user> folder in TMPDIR when it loads a program (as in test_security)
    left = [p for p in tmp.iterdir() if not (p.name.startswith("torchinductor_") and not any(p.iterdir()))]
    assert list(cwd.iterdir()) == [] and left == []
    for base in (root, cases, cwd, Path("/tmp"), Path("/")):
        assert not list(base.glob(f"{ESCAPE}*")), f"a hostile member name was written under {base}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-base") / "cnn.luodi"
    luodi.compile(small_cnn(), path, targets=["onnxruntime", "reference"], name="small-cnn")
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    return data, manifest, members


def write_zip(path: Path, entries: list[tuple[str, bytes, int]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a case on purpose
        with zipfile.ZipFile(path, "w") as zf:
            for name, data, method in entries:
                zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, compress_type=method)


def pin(manifest: dict, name: str, data: bytes) -> None:
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


X = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


def attempt(path: Path) -> str:
    """Open, read every member, start a Session and run it; 'ok' or 'refused' (a LuodiError). Anything else raises."""
    try:
        pkg = luodi.Package(path)
        for name in pkg.manifest["files"]:
            pkg.read(name)
        for target in pkg.targets:
            pkg.artifact(target)
        with luodi.Session(pkg, backend="onnxruntime") as s:
            feeds = {}
            for spec in s.inputs:
                shape = spec.concrete(2)
                if int(np.prod(shape)) * spec.np_dtype.itemsize > 1 << 20:
                    return "ok"  # a declared shape we do not allocate in a fuzz loop
                feeds[spec.name] = np.zeros(shape, spec.np_dtype) if spec.shape != (2, 3, 16, 16) else X
            s.run(feeds)
        return "ok"
    except luodi.LuodiError as exc:
        assert str(exc), "a LuodiError must say what was wrong"
        return "refused"


def test_unmutated_package_works(base, sandbox):
    path = sandbox / "clean.luodi"
    path.write_bytes(base[0])
    assert attempt(path) == "ok"


edits = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
        st.tuples(st.just("overwrite"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 64)),
    ),
    min_size=1,
    max_size=4,
)


@fuzz(N_BYTES)
@given(edits=edits, tail=st.booleans())
def test_mutated_bytes(base, sandbox, edits, tail):
    data = bytearray(base[0])
    for op, pos, *rest in edits:
        # Half the cases aim at the last 200 bytes: the zip's central directory and end record.
        pos = (len(data) - 1 - pos % 200) if tail and data else pos % max(len(data), 1)
        if op == "flip" and data:
            data[pos] ^= 1 << rest[0]
        elif op == "truncate":
            del data[pos:]
        elif op == "overwrite":
            data[pos : pos + len(rest[0])] = rest[0]
        elif op == "insert":
            data[pos:pos] = rest[0]
        elif op == "delete":
            del data[pos : pos + rest[0]]
    path = sandbox / "bytes.luodi"
    path.write_bytes(bytes(data))
    attempt(path)


member_ops = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 9)),
        st.tuples(st.just("add"), st.sampled_from(HOSTILE_NAMES), st.binary(max_size=64), st.booleans()),
        st.tuples(st.just("replace"), st.integers(0, 9), st.binary(max_size=256), st.booleans()),
        st.tuples(st.just("truncate"), st.integers(0, 9), st.integers(0, 4000), st.booleans()),
        st.tuples(st.just("rename"), st.integers(0, 9), st.sampled_from(HOSTILE_NAMES)),
        st.tuples(st.just("duplicate"), st.integers(0, 9), st.binary(max_size=64)),
        st.tuples(st.just("retarget"), st.sampled_from(HOSTILE_NAMES)),
    ),
    min_size=1,
    max_size=3,
)


@fuzz(N_MEMBERS)
@given(
    ops=member_ops,
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
)
def test_mutated_members(base, sandbox, ops, method):
    manifest = json.loads(json.dumps(base[1]))
    entries = [(n, d, method) for n, d in base[2].items()]
    for op, *args in ops:
        names = [e[0] for e in entries]
        if op == "drop" and entries:
            entries.pop(args[0] % len(entries))
        elif op == "add":
            name, data, pinned = args
            entries.append((name, data, method))
            if pinned:
                pin(manifest, name, data)
        elif op in ("replace", "truncate") and entries:
            i = args[0] % len(entries)
            name, data, _ = entries[i]
            data = args[1] if op == "replace" else data[: args[1]]
            entries[i] = (name, data, method)
            if args[2]:  # re-pinned: the hostile bytes get past the checksum to the engine
                pin(manifest, name, data)
        elif op == "rename" and entries:
            i = args[0] % len(entries)
            entries[i] = (args[1], entries[i][1], method)
        elif op == "duplicate" and entries:
            entries.append((names[args[0] % len(names)], args[1], method))
        elif op == "retarget":  # point the onnxruntime target at a hostile member name
            manifest["targets"][0]["files"]["model.onnx"] = args[0]
    path = sandbox / "members.luodi"
    write_zip(path, [("manifest.json", json.dumps(manifest).encode(), zipfile.ZIP_DEFLATED), *entries])
    attempt(path)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


manifest_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "add"]),
        st.integers(0, 10_000),
        hostile_values,
    ),
    min_size=1,
    max_size=3,
)


@fuzz(N_MANIFEST)
@given(ops=manifest_ops, shape_bias=st.booleans(), nest=st.integers(0, 3))
def test_mutated_manifest(base, sandbox, ops, shape_bias, nest):
    manifest = json.loads(json.dumps(base[1]))
    for op, pick, value in ops:
        paths = [p for p in _paths(manifest) if p]
        if shape_bias:  # half the cases aim at shapes, sizes and member names: what allocates or touches files
            focus = [p for p in paths if {"shape", "files", "size", "example_shapes", "inputs"} & set(map(str, p))]
            paths = focus or paths
        path = paths[pick % len(paths)]
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "set":
            parent[key] = value
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[str(value)[:20]] = value
        else:
            parent.append(value)
    blob = json.dumps(manifest).encode()
    if nest == 3:  # a manifest nested deeper than the JSON parser's recursion limit
        blob = b"[" * 100_000 + b"]" * 100_000
    path = sandbox / "manifest.luodi"
    write_zip(path, [("manifest.json", blob, zipfile.ZIP_DEFLATED), *((n, d, 8) for n, d in base[2].items())])
    attempt(path)


@pytest.fixture(scope="module")
def session(base, sandbox):
    path = sandbox / "session.luodi"
    path.write_bytes(base[0])
    with luodi.Session(path, backend="onnxruntime") as s:
        yield s


DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "object", ">f4"]
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 16, 17]), st.sampled_from([2**20, 2**40]))


@fuzz(N_INPUTS)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.one_of(st.lists(dims, max_size=6), st.just([2, 3, 16, 16]), st.just([1, 3, 16, 16])),
    fill=st.sampled_from(["random", "nan", "inf", "-inf", "zeros"]),
    layout=st.sampled_from(["c", "fortran", "strided", "broadcast", "list", "scalar", "string", "none"]),
    verb=st.sampled_from(["run", "six", "batch"]),
)
def test_mutated_inputs(session, dtype, shape, fill, layout, verb):
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=object))
    assume(int(np.prod([max(d, 1) for d in shape], dtype=object)) * 16 < 2**62)  # numpy's own limit on a view
    if layout == "broadcast" or n * dt.itemsize > 1 << 22:  # a huge shape: a zero-stride view, never allocated
        x = np.broadcast_to(np.zeros((), dt), shape)
    else:
        base = np.random.default_rng(n).standard_normal(n).reshape(shape)
        if fill != "random":
            base[...] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "zeros": 0}[fill]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = base.astype(dt)
        if layout == "fortran":
            x = np.asfortranarray(x)
        elif layout == "strided" and x.ndim:
            wide = np.zeros((*x.shape[:-1], x.shape[-1] * 2), dt)
            wide[..., ::2] = x
            x = wide[..., ::2]
    small = int(np.prod([max(d, 1) for d in shape], dtype=object)) < 10_000  # tolist() builds even empty rows
    value = {"list": x.tolist() if small else x, "scalar": 1.5, "string": "abc", "none": None}.get(layout, x)
    fits = (
        dtype == "float32"
        and list(shape) in ([2, 3, 16, 16], [1, 3, 16, 16])
        and layout in ("c", "fortran", "strided", "broadcast", "list")
    )
    try:
        if verb == "run":
            y = session.run({"x": value})["y"]
        elif verb == "six":
            session.set_tensor("x", value)
            session.forward()
            y = session.get_tensor("y")
        else:
            y = np.concatenate([r["y"] for r in session.run_batch([{"x": value}], max_batch=4)])
    except luodi.LuodiError as exc:
        assert not fits, f"a valid input was refused: {exc}"
        return
    if fits:  # NaN/Inf and non-contiguous layouts work, and give what the contiguous array gives
        want = session.run({"x": np.ascontiguousarray(np.asarray(value, np.float32))})["y"]
        np.testing.assert_array_equal(y, want)


def _bomb(path: Path, target: str, declared: int, pinned: int | None, base) -> None:
    """A package whose ``target`` member inflates to ``declared`` zero bytes (streamed: never held in memory)."""
    manifest = json.loads(json.dumps(base[1]))
    chunk = bytes(1 << 20)
    digest = hashlib.sha256()
    for _ in range(declared >> 20):
        digest.update(chunk)
    with zipfile.ZipFile(path, "w") as zf:
        if target != "manifest.json":
            manifest["files"][target] = {
                "sha256": digest.hexdigest(),
                "size": pinned if pinned is not None else declared,
            }
            zf.writestr("manifest.json", json.dumps(manifest), compress_type=zipfile.ZIP_DEFLATED)
        for name, data in base[2].items():
            if name != target:
                zf.writestr(name, data)
        info = zipfile.ZipInfo(target)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            for _ in range(declared >> 20):
                fh.write(chunk)


@pytest.mark.parametrize(
    "target,pinned",
    [
        ("targets/onnxruntime-fp32/model.onnx", None),  # honest sizes: refused by its inflation ratio
        ("targets/onnxruntime-fp32/model.onnx", 2048),  # the manifest pins a small size: refused by the mismatch
        ("model.onnx", None),
        ("manifest.json", None),  # over the manifest's size limit
    ],
)
def test_zip_bombs_are_refused_before_inflating(base, sandbox, target, pinned):
    path = sandbox / "bomb.luodi"
    _bomb(path, target, 128 << 20, pinned, base)
    assert path.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(luodi.PackageError, match="zip bomb|pins 2048|over the .* limit"):
            pkg = luodi.Package(path)
            pkg.read(target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading the bomb allocated {peak >> 20} MiB"
    path.unlink()


def test_hostile_names_and_shapes_are_named_in_the_error(base, sandbox):
    manifest = json.loads(json.dumps(base[1]))
    manifest["targets"][0]["files"]["model.onnx"] = f"../{ESCAPE}"
    path = sandbox / "names.luodi"
    write_zip(path, [("manifest.json", json.dumps(manifest).encode(), 8), *((n, d, 8) for n, d in base[2].items())])
    with pytest.raises(
        luodi.PackageError, match=r"targets\[0\].files\['model.onnx'\] '\.\./luodi-fuzz-escape' is not a safe"
    ):
        luodi.Package(path)
    manifest = json.loads(json.dumps(base[1]))
    manifest["inputs"][0]["shape"] = [2**31 - 1, 3, 2**20, 16]
    write_zip(path, [("manifest.json", json.dumps(manifest).encode(), 8), *((n, d, 8) for n, d in base[2].items())])
    with pytest.raises(luodi.PackageError, match=r"inputs\[0\].shape .* bytes, over the 1073741824 limit"):
        luodi.Package(path)


# -- hostile target options, on every engine ------------------------------------------------------------------
ENGINES = ["onnxruntime", "openvino", "ncnn", "mnn", "torch"]
OPTION_EDITS = {
    "options dropped": lambda o: None,
    "options a list": lambda o: [1, 2],
    "inputs dropped": lambda o: {k: v for k, v in o.items() if k != "inputs"},
    "inputs a number": lambda o: {**o, "inputs": 5},
    "inputs without shapes": lambda o: {**o, "inputs": [{"name": "x"}]},
    "outputs of strings": lambda o: {**o, "outputs": ["y", 3]},
    "a flag of the wrong type": lambda o: {**o, "precision_flags": "on", "precision_mode": 7, "performance_hint": []},
}


@pytest.fixture(scope="module")
def every_engine(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install 'luodi[torch]'")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("engines") / "conv.luodi"
    luodi.export(module, torch.zeros(1, 3, 8, 8), path, targets=[e for e in ENGINES if installed(e)])
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    return json.loads(members.pop("manifest.json")), members


@pytest.mark.parametrize("edit", list(OPTION_EDITS))
@pytest.mark.parametrize("engine", ENGINES)
def test_hostile_target_options_are_refused_on_every_engine(every_engine, sandbox, engine, edit):
    if not installed(engine):
        pytest.skip(f"{engine} is not installed (make test installs every engine)")
    manifest, members = json.loads(json.dumps(every_engine[0])), every_engine[1]
    target = next(t for t in manifest["targets"] if t["backend"] == engine and t["precision"] == "fp32")
    changed = OPTION_EDITS[edit](dict(target.get("options") or {}))
    if changed is None:
        target.pop("options", None)
    else:
        target["options"] = changed
    path = sandbox / f"{engine}-{edit.replace(' ', '-')}.luodi"
    entries = [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    write_zip(path, [("manifest.json", json.dumps(manifest).encode(), zipfile.ZIP_DEFLATED), *entries])
    try:
        with luodi.Session(path, backend=engine, precision="fp32") as s:
            s.run({s.inputs[0].name: np.ones((1, 3, 8, 8), np.float32)})
    except luodi.LuodiError as exc:
        assert str(exc)


# -- engine artifacts, in worker processes: the CI share of benchmarks/fuzz.py ---------------------------------
def test_engine_artifact_campaign_subset(tmp_path):
    """A seeded share of the fuzz campaign (benchmarks/fuzz.py): mutated ncnn param/bin, MNN, OpenVINO IR, torch
    program, ONNX, manifest, members and bytes, each run in a worker process whose death counts as a crash."""
    cases = max(10, int(120 * SCALE))
    script = Path(__file__).parents[1] / "benchmarks" / "fuzz.py"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(luodi.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    summary_file = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--cases",
            str(cases),
            "--seed",
            "1",
            "--workers",
            "2",
            "--json",
            str(summary_file),
            "--keep",
            str(tmp_path / "campaign"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    summary = json.loads(summary_file.read_text())
    assert summary["cases"] == cases, proc.stdout + proc.stderr
    for bad in ("crash", "hang", "escape", "bad-case"):
        assert summary["outcomes"].get(bad, 0) == 0, summary["failures"]
    assert summary["written_outside"] == []
    assert summary["outcomes"].get("ok", 0) and summary["outcomes"].get("refused", 0)
