"""What reads a package after it is written: `luodi run`, `luodi info --json`, Session's target names, failed
targets refused unless opted in, and `luodi verify` turning a wrong output shape into a FAIL row.

The CLI runs as a user runs it (a subprocess); packages are compiled for real. A failed target is made by
rewriting a real package's manifest the way the compiler records a failure (``status``/``reason``), or the way
older packages did (``verification.passed: false``); a wrong-shape target is a real artifact of another graph.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from conftest import installed, small_cnn


def luodi_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=300)


def rewrite(src: Path, dst: Path, edit: Callable[[dict], None], members: dict[str, bytes] | None = None) -> Path:
    """A copy of package ``src`` whose manifest ``edit`` changed (and whose ``members`` are replaced, re-pinned)."""
    members = members or {}
    with zipfile.ZipFile(src) as zin:
        manifest = json.loads(zin.read("manifest.json"))
        for name, data in members.items():
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        edit(manifest)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename == "manifest.json":
                    zout.writestr(info.filename, json.dumps(manifest))
                else:
                    zout.writestr(info.filename, members.get(info.filename, zin.read(info.filename)))
    return dst


def flat(text: str) -> str:
    """A rich table's text without its borders and line wraps, so a wrapped cell reads as one string."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇┴┬╈┼]", " ", text).split())


def _x(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


# -- luodi run --------------------------------------------------------------------------------------------------------
def test_run_reads_npy_writes_npy_and_summarises(tmp_path, cnn_package):
    x = _x()
    np.save(tmp_path / "x.npy", x)
    with luodi.Session(cnn_package, backend="onnxruntime") as s:
        expected = s.run({"x": x})["y"]
    r = luodi_cli("run", str(cnn_package), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "y.npy"), expected, rtol=1e-6, atol=1e-6)
    assert "[2, 5]" in r.stdout and "float32" in r.stdout and "y.npy" in r.stdout
    assert f"{expected.max():.6g}" in r.stdout

    r = luodi_cli("run", str(cnn_package), "-i", str(tmp_path / "x.npy"), "--json", "-t", "reference:fp32")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary) == {"package", "target", "selection", "run_ms", "outputs"}
    assert summary["target"] == "reference:fp32"
    y = summary["outputs"]["y"]
    assert y["shape"] == [2, 5] and y["dtype"] == "float32" and y["file"] is None and y["nonfinite"] == 0
    assert y["min"] == pytest.approx(float(expected.min()), abs=1e-5)
    assert y["max"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert y["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    np.save(tmp_path / "x.npy", _x())
    np.save(tmp_path / "x64.npy", _x().astype(np.float64))
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8), np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("not an array")
    np.savez(tmp_path / "inputs.npz")  # no arrays at all
    x = str(tmp_path / "x.npy")
    return {
        "unknown name": (["-i", f"images={x}"], "no input 'images'"),
        "twice": (["-i", f"x={x}", "-i", f"x={x}"], "given twice"),
        "none for x": (["-i", f"{tmp_path / 'inputs.npz'}"], "no --input for x (float32 [batch, 3, 16, 16])"),
        "dtype": (["-i", f"x={tmp_path / 'x64.npy'}"], "expects dtype float32, got float64"),
        "shape": (["-i", f"x={tmp_path / 'small.npy'}"], "expects shape [batch, 3, 16, 16], got [1, 3, 8]"),
        "missing file": (["-i", f"x={tmp_path / 'nope.npy'}"], "no file"),
        "pickle": (["-i", f"x={tmp_path / 'obj.npy'}"], "never unpickles"),
        "not npy": (["-i", f"x={tmp_path / 'text.npy'}"], "not an .npy file"),
    }


@pytest.mark.parametrize(
    "case", ["unknown name", "twice", "none for x", "dtype", "shape", "missing file", "pickle", "not npy"]
)
def test_run_bad_inputs_are_one_line_errors(tmp_path, cnn_package, case):
    args, message = _bad_inputs(tmp_path)[case]
    r = luodi_cli("run", str(cnn_package), *args, "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a run that did not happen


def test_run_keeps_output_files_inside_the_folder(tmp_path):
    """Output names are graph names, not paths: '../evil' and 'a/b' are written inside -o DIR."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["../evil"]), helper.make_node("Neg", ["x"], ["a/b"])],
        "names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("../evil", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("a/b", TensorProto.FLOAT, [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    pkg = luodi.compile(model, tmp_path / "names.luodi", passes=None)
    np.save(tmp_path / "x.npy", np.array([1, 2], np.float32))
    out = tmp_path / "deep" / "out"
    r = luodi_cli("run", str(pkg.path), "-i", str(tmp_path / "x.npy"), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    files = {k: Path(v["file"]) for k, v in json.loads(r.stdout)["outputs"].items()}
    assert all(f.parent == out for f in files.values()), files
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in files.values())  # no temp files left
    np.testing.assert_array_equal(np.load(files["a/b"]), [-1, -2])
    assert not (tmp_path / "deep" / "evil.npy").exists()


# -- info --json and the API's target names -----------------------------------------------------------------------
INFO_KEYS = {
    "name",
    "version",
    "description",
    "created",
    "luodi",
    "toolchain",
    "inputs",
    "outputs",
    "shapes",
    "targets",
    "accuracy_budget",
    "pipeline",
    "passes",
    "models",
    "encrypted",
    "signer",
}
TARGET_KEYS = {
    "target",
    "backend",
    "precision",
    "status",
    "reason",
    "size_bytes",
    "engine_version",
    "verification",
    "timing",
    "io",
    "estimate",
}


def test_info_json_has_stable_keys(cnn_package):
    r = luodi_cli("info", str(cnn_package), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info) == INFO_KEYS
    assert info["name"] == "small-cnn" and info["encrypted"] is False and info["models"] == {}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 5]}]
    assert info["shapes"]["representative"][0] == {"x": [1, 3, 16, 16]}
    assert [t["target"] for t in info["targets"]] == ["onnxruntime:fp32", "reference:fp32"]
    for t in info["targets"]:
        assert set(t) == TARGET_KEYS and t["status"] == "verified" and t["reason"] is None
        assert t["size_bytes"] > 0 and t["verification"]["passed"] is True


def test_session_takes_the_cli_target_names(tmp_path, cnn_package, cnn_model):
    x = _x(1)
    with luodi.Session(cnn_package, backend="onnxruntime:fp32") as s:
        assert (s.backend, s.precision) == ("onnxruntime", "fp32") and s.run({"x": x})["y"].shape == (1, 5)
    with luodi.Session(cnn_package, backend="reference:fp32", precision="fp32") as s:
        assert s.backend == "reference"
    with pytest.raises(luodi.InputError, match="asks for precision 'fp32' but precision='int8'"):
        luodi.Session(cnn_package, backend="onnxruntime:fp32", precision="int8")
    with pytest.raises(luodi.PackageError, match="has no target onnxruntime:int8"):
        luodi.Session(cnn_package, backend="onnxruntime:int8")
    with pytest.raises(luodi.InputError, match="BACKEND:PRECISION"):
        luodi.Session(cnn_package, backend="onnxruntime:")
    with luodi.Session(cnn_model, backend="onnxruntime:fp32") as s:  # an ONNX model compiled in memory
        assert (s.backend, s.precision) == ("onnxruntime", "fp32")


# -- failed targets -------------------------------------------------------------------------------------------------
REASON = "converter crashed: pnnx exited with signal 11 (Unsupported model IR version: 14)"


def _mark_failed(old_style: bool, files: bool = True) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        t = m["targets"][0]  # onnxruntime:fp32
        if old_style:  # a package written before targets had a status: a verification that did not pass
            t["verification"]["passed"] = False
            t["verification"]["outputs"]["y"]["max_abs"] = 0.5
        else:
            t.update(status="failed", reason=REASON)
        if not files:
            t["files"] = {}

    return edit


@pytest.fixture(params=["status", "old-style"])
def failed_package(request, tmp_path, cnn_package) -> Path:
    return rewrite(cnn_package, tmp_path / "failed.luodi", _mark_failed(request.param == "old-style"))


def test_failed_target_is_refused_by_name_and_never_chosen_by_auto(failed_package):
    with pytest.raises(luodi.FailedTargetError, match="failed at compile time") as exc:
        luodi.Session(failed_package, backend="onnxruntime")
    assert "allow_failed=True" in str(exc.value) and "--allow-failed" in str(exc.value)
    if json.loads(zipfile.ZipFile(failed_package).read("manifest.json"))["targets"][0].get("reason"):
        assert REASON in str(exc.value)
    else:
        assert "output 'y' outside its tolerance" in str(exc.value)
    with pytest.raises(luodi.BackendUnavailableError, match=r"onnxruntime:fp32: failed at compile time"):
        luodi.Session(failed_package)  # auto: the reference is never chosen, and the failed target not either


def test_allow_failed_loads_it_with_a_warning(failed_package, caplog):
    with (
        caplog.at_level("WARNING", logger="luodi"),
        luodi.Session(failed_package, backend="onnxruntime:fp32", allow_failed=True) as s,
    ):
        assert s.run({"x": _x(1)})["y"].shape == (1, 5)
        assert "FAILED at compile time" in s.selection
    assert any("failed at compile time" in r.getMessage() for r in caplog.records)


def test_a_failed_target_with_nothing_compiled_cannot_be_loaded(tmp_path, cnn_package):
    pkg = rewrite(cnn_package, tmp_path / "empty.luodi", _mark_failed(False, files=False))
    for allow in (False, True):
        with pytest.raises(luodi.FailedTargetError, match="nothing was compiled") as exc:
            luodi.Session(pkg, backend="onnxruntime", allow_failed=allow)
        assert "allow_failed=True" not in str(exc.value)  # no opt-in to suggest: there is nothing to load


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_auto_skips_a_failed_target_for_a_good_one(tmp_path, cnn_model):
    pkg = luodi.compile(cnn_model, tmp_path / "two.luodi", targets=["onnxruntime", "openvino"])
    failed = rewrite(pkg.path, tmp_path / "f.luodi", _mark_failed(False))
    with luodi.Session(failed) as s:
        assert s.backend == "openvino" and "onnxruntime:fp32: failed at compile time" in s.selection


@pytest.mark.slow
def test_cli_lists_refuses_and_opts_in_to_failed_targets(tmp_path, cnn_package):
    pkg = rewrite(cnn_package, tmp_path / "failed.luodi", _mark_failed(False))
    np.save(tmp_path / "x.npy", _x(1))
    r = luodi_cli("info", str(pkg))
    assert r.returncode == 0, r.stderr
    assert "1 target(s) failed at compile time" in r.stdout
    assert f"onnxruntime:fp32: {REASON}" in flat(r.stdout)
    info = json.loads(luodi_cli("info", str(pkg), "--json").stdout)
    assert [(t["status"], t["reason"]) for t in info["targets"]] == [("failed", REASON), ("verified", None)]

    r = luodi_cli("run", str(pkg), "-i", str(tmp_path / "x.npy"), "-t", "onnxruntime")
    assert r.returncode == 2 and "failed at compile time" in r.stderr and "--allow-failed" in r.stderr
    r = luodi_cli("run", str(pkg), "-i", str(tmp_path / "x.npy"), "-t", "onnxruntime", "--allow-failed")
    assert r.returncode == 0 and "[1, 5]" in r.stdout, r.stderr

    r = luodi_cli("verify", str(pkg))
    assert r.returncode == 1 and "FAIL: failed at compile time, not run" in flat(r.stdout), r.stdout + r.stderr
    r = luodi_cli("verify", str(pkg), "--allow-failed")
    assert r.returncode == 0 and "pass" in r.stdout, r.stdout + r.stderr


def _det_model() -> onnx.ModelProto:
    """Det of a batch of 2x2 matrices: onnxruntime runs it, OpenVINO has no Det."""
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_a_real_partial_compile_is_read_as_failed(tmp_path):
    try:
        pkg = luodi.compile(_det_model(), tmp_path / "det.luodi", targets=["onnxruntime", "openvino"])
    except luodi.UnsupportedOpError:
        pytest.skip("this compiler stops at the first failing target (the keep-going compile is not merged)")
    with pytest.raises(luodi.FailedTargetError, match="Det"):
        luodi.Session(pkg.path, backend="openvino")
    with luodi.Session(pkg.path) as s:
        assert s.backend == "onnxruntime"
    r = luodi_cli("info", str(pkg.path))
    assert "1 target(s) failed" in r.stdout and "openvino:fp32" in r.stdout


# -- luodi verify: a wrong output shape is a row ------------------------------------------------------------------
def _narrow_cnn() -> onnx.ModelProto:
    """small_cnn with a 4-wide head instead of 5: the same input, an output of another shape."""
    model = small_cnn()
    for init in model.graph.initializer:
        if init.name in ("fw", "fb"):
            arr = numpy_helper.to_array(init)[:4]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4
    return model


def test_verify_reports_a_wrong_output_shape_as_a_failed_row(tmp_path, cnn_package):
    narrow = luodi.compile(_narrow_cnn(), tmp_path / "narrow.luodi", targets=["onnxruntime"], passes=None)
    member = narrow.find_target("onnxruntime")["files"]["model.onnx"]
    ours = luodi.Package(cnn_package).find_target("onnxruntime")["files"]["model.onnx"]
    wrong = rewrite(cnn_package, tmp_path / "wrong.luodi", lambda m: None, {ours: narrow.read(member)})
    np.save(tmp_path / "x.npy", _x(3))
    for extra in ([], ["--data", str(tmp_path / "x.npy")]):
        r = luodi_cli("verify", str(wrong), *extra)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        assert "onnxruntime:fp32 y - - - FAIL:" in flat(r.stdout), r.stdout
        assert "shape (1, 4) where the reference has (1, 5)" in flat(r.stdout)


def test_compare_output_nan_and_integers():
    from luodi.verify.report import compare_output

    ref = np.array([[1.0, 2.0]], np.float32)
    nan = compare_output("t:fp32", "y", [ref], [np.array([[1.0, np.nan]], np.float32)])
    assert not nan.passed and "NaN" in nan.problem
    both = np.array([[np.nan, 2.0]], np.float32)
    assert compare_output("t:fp32", "y", [both], [both.copy()]).passed  # NaN where the reference has it: equal
    ints = compare_output("t:fp32", "ids", [np.array([3, 4])], [np.array([3, 5])])
    assert not ints.passed and ints.max_abs == 1 and "must be equal" in ints.problem  # integers exactly at fp32


# -- representative shapes: auto's timing and luodi verify ----------------------------------------------------------
def _valid_conv() -> onnx.ModelProto:
    """A 3x3 convolution without padding on free height and width: it cannot run at 1x1 (free dims at 1)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "valid_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "oh", "ow"])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _with_shapes(sets: list[dict[str, list[int]]]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m.pop("example_shapes", None)  # only the representative sets say what the package runs at
        m["shapes"] = {**(m.get("shapes") or {}), "representative": sets}

    return edit


@pytest.mark.skipif(not installed("openvino"), reason="needs a second engine: pip install 'luodi[openvino]'")
def test_auto_times_the_targets_at_the_representative_shapes(tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 1, 12, 10)).astype(np.float32)
    pkg = luodi.compile(_valid_conv(), tmp_path / "c.luodi", targets=["onnxruntime", "openvino"], samples=[{"x": x}])
    shaped = rewrite(pkg.path, tmp_path / "shaped.luodi", _with_shapes([{"x": [1, 1, 12, 10]}]))
    with luodi.Session(shaped) as s:
        assert "fastest measured on this host" in s.selection and "could not be loaded" not in s.selection
        s.prepare()  # warm-up at the primary set, not at 1x1
        assert s.run({"x": x})["y"].shape == (1, 2, 10, 8)


def test_verify_runs_at_every_representative_shape_set(tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 1, 12, 10)).astype(np.float32)
    pkg = luodi.compile(_valid_conv(), tmp_path / "c.luodi", targets=["onnxruntime"], samples=[{"x": x}])
    sets = [{"x": [1, 1, 12, 10]}, {"x": [2, 1, 7, 30]}]
    shaped = rewrite(pkg.path, tmp_path / "shaped.luodi", _with_shapes(sets))
    r = luodi_cli("verify", str(shaped))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 4 random input(s) at the representative shapes" in flat(r.stdout)
    assert "onnxruntime:fp32 y" in flat(r.stdout) and "pass" in r.stdout
