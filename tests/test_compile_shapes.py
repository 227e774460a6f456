"""The compiler on models as users bring them: representative shapes, domain-aware inputs, a compile that keeps
going past a failing target, and verification that cannot pass a wrong output. Small onnx.helper models, real
engines; the one test double is an engine that fixes a dynamic dimension, to show such an engine is caught."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from conftest import fcn_model, installed
from luodi.backends import CompileOptions, LoadOptions, get_backend
from luodi.backends.base import Artifact, Backend, Engine
from luodi.compiler.shapes import plan_shapes
from luodi.package.archive import write_package
from luodi.tensor import TensorSpec
from luodi.verify import compare_arrays

ENGINES = ["onnxruntime", "openvino", "ncnn", "mnn"]


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def log_model() -> onnx.ModelProto:
    """A single Log: NaN wherever the random input is negative."""
    return _model(
        [helper.make_node("Log", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
    )


def unique_model() -> onnx.ModelProto:
    """Unique: onnxruntime runs it, pnnx cannot convert it for ncnn."""
    return _model(
        [helper.make_node("Unique", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )


def gather_model(rows: int = 5) -> onnx.ModelProto:
    """An embedding lookup: int64 token ids [1, seq] index a [rows, 4] table."""
    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table")
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 4])],
        [table],
    )


def luodi_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=600)


# -- representative shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_dynamic_height_width_verified_at_two_sizes(tmp_path, engine):
    if not installed(engine):
        pytest.skip(f"{engine} is not installed")
    pkg = luodi.compile(fcn_model(), tmp_path / "fcn.luodi", [engine], input_shapes={"x": "1x3x32..128x32..128"})
    target = pkg.targets[0]
    assert target["status"] == "verified", target.get("reason")
    shapes = target["verification"]["shapes"]
    assert shapes == [{"x": [1, 3, 64, 64]}, {"x": [2, 3, 32, 32]}]  # the middle of the range, then its low end
    assert pkg.manifest["shapes"]["ranges"] == {"x": {"2": [32, 128], "3": [32, 128]}}
    assert pkg.representative_shapes == [{"x": (1, 3, 64, 64)}, {"x": (2, 3, 32, 32)}]


class FixedShapeBackend(Backend):
    """An engine that silently fixes every dynamic dimension at the size it was converted at (as pnnx did at 1):
    at any other size it runs a crop of the input and returns an output of the converted shape."""

    name = "fixed-shape"

    def compile(self, model, options: CompileOptions) -> Artifact:
        artifact = get_backend("onnxruntime").compile(model, CompileOptions())
        artifact.backend = self.name
        artifact.options["fixed"] = {n: list(s) for n, s in options.shapes[0].items()}
        return artifact

    def load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        ort = get_backend("onnxruntime").load(Artifact("onnxruntime", "fp32", artifact.files), options)
        fixed = artifact.options["fixed"]

        class Fixed(Engine):
            def run(self, feeds):
                return ort.run({n: a[tuple(slice(0, d) for d in fixed[n])] for n, a in feeds.items()})

        return Fixed(ort.inputs, ort.outputs)


@pytest.fixture
def fixed_shape_backend():
    from luodi.backends import _cache

    _cache["fixed-shape"] = FixedShapeBackend()
    yield
    del _cache["fixed-shape"]


def test_an_engine_that_fixed_a_dimension_is_caught_naming_both_shapes(tmp_path, fixed_shape_backend):
    pkg = luodi.compile(fcn_model(), tmp_path / "f.luodi", ["onnxruntime", "fixed-shape"])
    good, fixed = pkg.targets
    assert good["status"] == "verified"
    assert fixed["status"] == "failed"
    # free H/W of an image input: 224 (never 1), then a second size for every dynamic axis
    assert fixed["reason"] == "output 'y': sample 2: shape (1, 4, 96, 96) where the reference has (2, 4, 96, 96)"
    assert fixed["verification"]["outputs"]["y"]["max_abs"] is None


def test_free_image_axes_get_an_image_size_and_batch_a_second_size():
    spec = TensorSpec("images", "float32", ("N", 3, "H", "W"))
    plan = plan_shapes([spec])
    assert plan.sets == [{"images": (1, 3, 224, 224)}, {"images": (2, 3, 96, 96)}]
    seq = TensorSpec("ids", "int64", (1, "seq"))
    mask = TensorSpec("mask", "int64", (1, "seq"))
    plan = plan_shapes([seq, mask])  # a shared symbol keeps one size across inputs
    assert plan.sets == [{"ids": (1, 32), "mask": (1, 32)}, {"ids": (1, 64), "mask": (1, 64)}]


def test_index_inputs_are_generated_within_what_they_index(tmp_path):
    pkg = luodi.compile(gather_model(rows=5), tmp_path / "g.luodi", ["onnxruntime", "reference"])
    assert pkg.targets[0]["status"] == "verified"
    assert pkg.manifest["shapes"]["domains"]["ids"] == {"kind": "index", "low": 0.0, "high": 4.0}
    assert pkg.representative_shapes == [{"ids": (1, 32)}, {"ids": (1, 64)}]


def test_an_unrunnable_guess_is_refused_with_what_to_give(tmp_path):
    """A reshape to 8x8: the chosen size 32 cannot run; the compile says so and how to give a shape."""
    shape = numpy_helper.from_array(np.array([8, 8], np.int64), "shape")
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
        [shape],
    )
    with pytest.raises(luodi.CompileError, match=r"cannot run model .* at x=1.*--input-shape"):
        luodi.compile(model, tmp_path / "r.luodi")
    assert not list(tmp_path.iterdir())
    pkg = luodi.compile(model, tmp_path / "r.luodi", input_shapes={"x": [64]})
    # 64 runs; its second size (1: an axis 0 is taken for a batch) cannot, so that set is dropped, with a note
    assert pkg.representative_shapes == [{"x": (64,)}]
    assert pkg.manifest["shapes"]["notes"][0].startswith("x=1 was not used: the model cannot run it")
    assert pkg.targets[0]["status"] == "verified"


def test_bad_shapes_and_samples_are_refused_clearly(tmp_path):
    m = fcn_model()
    cases = [
        ({"input_shapes": {"nope": "1x3x8x8"}}, "has no input 'nope'"),
        ({"input_shapes": {"x": "1x3x8"}}, "has 4 axes"),
        ({"input_shapes": {"x": "1x4x8x8"}}, "axis 1 of input 'x' is fixed at 3"),
        ({"input_shapes": {"x": "1x3xtallx8"}}, "is not a shape"),
        ({"samples": [{"x": np.zeros((1, 3, 8, 8), np.float32), "z": np.zeros(1)}]}, "it has \\['z'\\]"),
        ({"samples": [{}]}, "it lacks \\['x'\\]"),
        ({"samples": [{"x": np.zeros((1, 3, 8, 8), np.float64)}]}, "expects dtype float32, got float64"),
        ({"samples": [{"x": np.zeros((1, 5, 8, 8), np.float32)}]}, "expects shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(luodi.InputError, match=message):
            luodi.compile(m, tmp_path / "b.luodi", **kwargs)
    assert not list(tmp_path.iterdir())


# -- verification that cannot pass a wrong output ------------------------------------------------------------------


def test_comparison_rules():
    ref = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    same = compare_arrays("y", ref, ref.copy())
    assert same.passes("fp32") and same.max_abs == 0.0
    moved = compare_arrays("y", ref, np.array([np.nan, 1.0, np.inf, 2.0], np.float32))
    assert not moved.passes("bf16") and "NaN at 1 position" in moved.mismatch
    assert not compare_arrays("y", ref, np.array([1.0, np.nan, -np.inf, 2.0], np.float32)).passes("int8")
    ids = np.array([3, 1, 4], np.int64)
    off = compare_arrays("ids", ids, ids + np.array([0, 0, 1]))
    assert off.exact and not off.passes("fp32") and off.max_abs == 1.0
    assert compare_arrays("ids", ids, ids.astype(np.int32)).passes("fp32")
    json.dumps(moved.to_dict(), allow_nan=False)  # every number finite or null


def test_nan_at_random_input_writes_a_readable_package(tmp_path):
    engines = [e for e in ("onnxruntime", "openvino", "reference") if installed(e)]
    pkg = luodi.compile(log_model(), tmp_path / "log.luodi", engines)
    reopened = luodi.Package(pkg.path)  # main failed here: the manifest held NaN and read as tampered
    for t in reopened.targets:
        assert t["status"] == "verified", t.get("reason")
    assert reopened.targets[0]["verification"]["outputs"]["y"]["max_abs"] < 1e-6  # over the finite positions
    assert luodi_cli("info", str(pkg.path)).returncode == 0


def test_write_package_never_leaves_an_unreadable_file(tmp_path):
    manifest = {"format": "luodi", "schema": 1, "name": "m", "inputs": [], "outputs": [], "targets": []}
    with pytest.raises(luodi.PackageError, match="cannot be written as JSON"):
        write_package(tmp_path / "a.luodi", {**manifest, "score": float("nan")}, {})
    bad_target = {"backend": "onnxruntime", "precision": "fp32", "files": {"m": "absent.bin"}}
    with pytest.raises(luodi.PackageError, match="does not read back"):
        write_package(tmp_path / "a.luodi", {**manifest, "targets": [bad_target]}, {})
    assert not list(tmp_path.iterdir())  # neither the package nor its temporary file


# -- a compile that keeps going ------------------------------------------------------------------------------------


@pytest.mark.skipif(not installed("ncnn"), reason="ncnn is not installed")
def test_partial_compile_records_the_failing_target_and_writes_the_others(tmp_path):
    pkg = luodi.compile(unique_model(), tmp_path / "u.luodi", ["onnxruntime", "ncnn", "reference"])
    by = {t["backend"]: t for t in luodi.Package(pkg.path).targets}
    assert by["onnxruntime"]["status"] == "verified"
    assert by["reference"]["status"] == "verified" and by["reference"]["verification"]["reference"] is True
    assert by["ncnn"]["status"] == "failed" and by["ncnn"]["files"] == {}
    assert "Unique" in by["ncnn"]["reason"] and "\n" not in by["ncnn"]["reason"]
    with pytest.raises(luodi.UnsupportedOpError, match="target ncnn:fp32 .*Unique.*nothing was written"):
        luodi.compile(unique_model(), tmp_path / "s.luodi", ["onnxruntime", "ncnn"], strict=True)
    assert not (tmp_path / "s.luodi").exists()
    with pytest.raises(luodi.UnsupportedOpError, match="Unique.*nothing was written"):  # its own error
        luodi.compile(unique_model(), tmp_path / "n.luodi", ["ncnn"])
    with pytest.raises(luodi.CompileError, match="no target could be compiled.*ncnn:fp32: .*Unique"):
        luodi.compile(unique_model(), tmp_path / "n.luodi", ["ncnn", "ncnn:fp16"])
    assert not (tmp_path / "n.luodi").exists()


@pytest.mark.skipif(not installed("ncnn"), reason="ncnn is not installed")
@pytest.mark.slow
def test_partial_compile_cli_exit_status(tmp_path):
    model = tmp_path / "unique.onnx"
    onnx.save(unique_model(), model)
    done = luodi_cli("compile", str(model), "-o", str(tmp_path / "u.luodi"), "-t", "onnxruntime", "-t", "ncnn", "-q")
    assert done.returncode == 3, done.stderr
    assert "partial package" in done.stderr and "ncnn:fp32" in done.stderr
    assert "FAILED" in done.stdout
    strict = luodi_cli("compile", str(model), "-o", str(tmp_path / "s.luodi"), "-t", "onnxruntime", "-t", "ncnn")
    assert strict.returncode == 3
    strict = luodi_cli(
        "compile", str(model), "-o", str(tmp_path / "s2.luodi"), "-t", "onnxruntime", "-t", "ncnn", "--strict"
    )
    assert strict.returncode == 2 and "nothing was written" in strict.stderr
    assert not (tmp_path / "s2.luodi").exists()


def test_multi_model_packages_keep_going_per_model(tmp_path):
    from luodi.frontends import SourceModel

    src = SourceModel(fcn_model(), "two", models={"second": SourceModel(log_model(), "second")})
    pkg = luodi.compile(src, tmp_path / "two.luodi", ["onnxruntime", "reference"])
    second = pkg.submodel("second")
    assert [t["status"] for t in second.targets] == ["verified", "verified"]
    assert second.representative_shapes == [{"x": (1, 16)}]
    assert pkg.representative_shapes[0] == {"x": (1, 3, 224, 224)}


# -- the command line ----------------------------------------------------------------------------------------------


def test_cli_input_shape_and_sample_reach_the_manifest_and_verification(tmp_path):
    model = tmp_path / "fcn.onnx"
    onnx.save(fcn_model(), model)
    sample = tmp_path / "s.npz"
    np.savez(sample, x=np.random.default_rng(0).random((1, 3, 40, 72), np.float32))
    done = luodi_cli("compile", str(model), "-o", str(tmp_path / "a.luodi"), "--sample", str(sample), "-q")
    assert done.returncode == 0, done.stderr
    pkg = luodi.Package(tmp_path / "a.luodi")
    # below 64 a second size doubles, from 64 up it halves
    assert pkg.representative_shapes == [{"x": (1, 3, 40, 72)}, {"x": (2, 3, 80, 36)}]
    assert pkg.targets[0]["verification"]["shapes"] == [{"x": [1, 3, 40, 72]}, {"x": [2, 3, 80, 36]}]
    done = luodi_cli("compile", str(model), "-o", str(tmp_path / "b.luodi"), "--input-shape", "x=1x3x96x160", "-q")
    assert done.returncode == 0, done.stderr
    assert luodi.Package(tmp_path / "b.luodi").representative_shapes[0] == {"x": (1, 3, 96, 160)}
    assert "verified at): x=1x3x96x160; x=2x3x32x64" in done.stdout
    bad = luodi_cli("compile", str(model), "-o", str(tmp_path / "c.luodi"), "--input-shape", "y=1x3x8x8")
    assert bad.returncode == 2 and "has no input 'y'" in bad.stderr and "Traceback" not in bad.stderr
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as zf:
        zf.writestr("x.npy", b"not an array")
    bad = luodi_cli("compile", str(model), "-o", str(tmp_path / "c.luodi"), "--sample", str(tmp_path / "bad.npz"))
    assert bad.returncode == 2 and "--sample" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "c.luodi").exists()
    assert Path(tmp_path / "a.luodi").exists()


def test_progress_shows_steps_on_a_terminal_and_nothing_when_quiet(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from luodi.progress import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = io.StringIO()
    with Progress(console=Console(file=shown, force_terminal=True, width=100)) as progress:
        luodi.compile(fcn_model(), tmp_path / "p.luodi", ["onnxruntime"], progress=progress)
    text = shown.getvalue()
    assert "running the reference" in text and "converting for onnxruntime:fp32" in text
    assert "verifying onnxruntime:fp32" in text and "3/3" in text
    quiet = io.StringIO()
    with Progress(quiet=True, console=Console(file=quiet, force_terminal=True)) as progress:
        luodi.compile(fcn_model(), tmp_path / "q.luodi", ["onnxruntime"], progress=progress)
    assert quiet.getvalue() == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a pipe or a CI log: nothing either
    assert not Progress(console=Console(file=io.StringIO(), force_terminal=True)).enabled


def test_an_output_below_the_noise_floor_is_judged_by_its_error():
    """A detector's map on a blank input: every value ~1e-6, rounding alone turns the cosine anywhere."""
    ref = np.full(100, 1e-6, np.float32)
    got = ref + np.random.default_rng(0).normal(0, 1e-6, 100).astype(np.float32)
    c = compare_arrays("map", ref, got)
    assert c.cosine == 1.0 and c.passes("fp32")
    assert not compare_arrays("map", ref, ref + 1e-3).passes("fp32")  # the error bound still holds


def test_axes_get_second_sizes_one_at_a_time_when_together_they_cannot_run(tmp_path):
    """Like an OCR recogniser (any width, one height): x [h, w] @ [4, 4] runs at any h but only at w = 4."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "weight")
    model = _model(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["h", 4])],
        [weight],
    )
    pkg = luodi.compile(model, tmp_path / "m.luodi", ["onnxruntime"], input_shapes={"x": "1x4"})
    assert pkg.representative_shapes == [{"x": (1, 4)}, {"x": (2, 4)}]
    notes = pkg.manifest["shapes"]["notes"]
    assert [n.split(" was not used")[0] for n in notes] == ["x=2x8", "x=1x8"]
    assert pkg.targets[0]["verification"]["shapes"] == [{"x": [1, 4]}, {"x": [2, 4]}]
