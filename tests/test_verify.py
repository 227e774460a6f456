"""Compile-time verification: the comparison numbers and the tolerance that catches silent downcasts."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from luodi.verify import compare, compare_arrays, sample_inputs


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 precision (keep 8 mantissa bits), as an AMX CPU does silently."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.view(np.float32)


def test_bf16_downcast_fails_fp32_tolerance_but_passes_bf16():
    logits = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32) * 5
    c = compare_arrays("logits", logits, to_bf16(logits))
    assert 1e-3 < c.max_abs < 0.1
    assert not c.passes("fp32")
    assert c.passes("bf16")
    exact = compare_arrays("logits", logits, logits + np.float32(1e-6))
    assert exact.passes("fp32") and exact.cosine > 0.9999999


def test_compare_reports_the_worst_sample():
    a = [{"y": np.ones(3, np.float32)}, {"y": np.ones(3, np.float32)}]
    b = [{"y": np.ones(3, np.float32)}, {"y": np.array([1, 1, 1.5], np.float32)}]
    worst = compare(a, b)["y"]
    assert worst.max_abs == pytest.approx(0.5)
    assert worst.cosine < 1


def test_shape_mismatch_never_passes():
    c = compare_arrays("y", np.ones((2, 3)), np.ones((3, 2)))
    assert not c.passes("fp32") and not c.passes("int8") and c.max_abs is None
    assert c.mismatch == "shape (3, 2) where the reference has (2, 3)"


def test_sample_inputs_are_deterministic(cnn_package):
    specs = luodi.Package(cnn_package).inputs
    a, b = sample_inputs(specs, seed=3), sample_inputs(specs, seed=3)
    assert a[0]["x"].shape == (1, 3, 16, 16) and a[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(a[1]["x"], b[1]["x"])


def test_user_samples_and_strict(tmp_path, cnn_model):
    x = np.full((2, 3, 16, 16), 0.5, np.float32)
    pkg = luodi.compile(cnn_model, tmp_path / "s.luodi", samples=[{"x": x}], strict=True)
    ver = pkg.targets[0]["verification"]
    # the sample, then a generated input giving the dynamic batch axis a second size
    assert ver["samples"] == 2 and ver["passed"]
    assert ver["shapes"] == [{"x": [2, 3, 16, 16]}, {"x": [1, 3, 16, 16]}]
    assert pkg.representative_shapes == [{"x": (2, 3, 16, 16)}, {"x": (1, 3, 16, 16)}]
    assert ver["outputs"]["y"]["ref_max"] > 0


def test_no_verify_records_nothing(tmp_path, cnn_model):
    pkg = luodi.compile(cnn_model, tmp_path / "n.luodi", verify=False)
    assert "verification" not in pkg.targets[0]


def test_bad_target_lists(tmp_path, cnn_model):
    with pytest.raises(luodi.CompileError, match="no targets"):
        luodi.compile(cnn_model, tmp_path / "a.luodi", targets=[])
    with pytest.raises(luodi.CompileError, match="twice"):
        luodi.compile(cnn_model, tmp_path / "a.luodi", targets=["onnxruntime", "onnxruntime:fp32"])
    with pytest.raises(luodi.CompileError, match="no precision 'int4'"):
        luodi.compile(cnn_model, tmp_path / "a.luodi", targets=["onnxruntime:int4"])
    with pytest.raises(luodi.BackendNotFoundError):
        luodi.compile(cnn_model, tmp_path / "a.luodi", targets=["warp-drive"])
    assert list(tmp_path.iterdir()) == []


def test_a_model_the_reference_evaluator_cannot_run_is_verified_against_onnxruntime(tmp_path) -> None:
    """An operator outside the ONNX standard (com.microsoft's Gelu) stops the evaluator, not the compile: targets are
    compared with onnxruntime on the canonical graph, and the records say so."""
    import onnx
    from onnx import TensorProto, helper

    import luodi

    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp_path / "gelu.onnx"
    onnx.save(model, path)
    pkg = luodi.compile(path, tmp_path / "gelu.luodi", ["onnxruntime", "reference"])
    by = {t["backend"]: t for t in pkg.targets}
    assert by["onnxruntime"]["status"] == "verified"
    assert by["onnxruntime"]["verification"]["against"].startswith("onnxruntime fp32 (the reference evaluator cannot")
    assert by["reference"]["status"] == "failed" and "com.microsoft" in by["reference"]["reason"]
