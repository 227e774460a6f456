"""The .luodi package: round trip, integrity, corrupt input, atomic writes."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from onnx import TensorProto, helper

import luodi
from luodi.package import write_package


def test_round_trip(cnn_package, cnn_model):
    pkg = luodi.Package(cnn_package)
    m = pkg.manifest
    assert m["format"] == "luodi" and m["schema"] == 1 and pkg.name == "small-cnn"
    assert [s.to_dict() for s in pkg.inputs] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert [t["backend"] for t in pkg.targets] == ["onnxruntime", "reference"]
    with zipfile.ZipFile(cnn_package) as zf:
        names = set(zf.namelist())
    assert names == {"manifest.json", "model.onnx", "targets/onnxruntime-fp32/model.onnx"}
    # every member is pinned, the reference shares the canonical model instead of a copy
    assert set(m["files"]) == names - {"manifest.json"}
    assert pkg.find_target("reference")["files"] == {"model.onnx": "model.onnx"}
    # the canonical graph is the model we gave (plus inferred shapes)
    assert [n.op_type for n in pkg.model().graph.node] == [n.op_type for n in cnn_model.graph.node]
    for t in pkg.targets:
        assert t["verification"]["passed"] is True and t["status"] == "verified"
    # the reference is the yardstick: recorded as such, never compared with itself
    assert pkg.find_target("reference")["verification"]["reference"] is True
    assert pkg.find_target("onnxruntime")["verification"]["outputs"]["y"]["max_abs"] < 1e-4
    assert m["toolchain"]["onnxruntime"] == __import__("onnxruntime").__version__


def test_truncated_package_is_a_package_error(cnn_package, tmp_path):
    data = cnn_package.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad = tmp_path / f"cut{cut}.luodi"
        bad.write_bytes(data[:cut])
        with pytest.raises(luodi.PackageError, match="truncated or corrupt"):
            luodi.Session(bad)


def test_random_bytes_are_a_package_error(tmp_path):
    bad = tmp_path / "random.luodi"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(luodi.PackageError, match="not a luodi package"):
        luodi.Package(bad)
    with pytest.raises(luodi.PackageError, match="no such file"):
        luodi.Package(tmp_path / "missing.luodi")


def test_zip_that_is_not_a_package(tmp_path):
    path = tmp_path / "other.luodi"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(luodi.PackageError, match="no manifest.json"):
        luodi.Package(path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", "{not json")
    with pytest.raises(luodi.PackageError, match="unreadable"):
        luodi.Package(path)


def test_tampered_member_is_an_integrity_error(cnn_package, tmp_path):
    bad = tmp_path / "tampered.luodi"
    with zipfile.ZipFile(cnn_package) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "targets/onnxruntime-fp32/model.onnx":
                data = data.replace(data[-8:], bytes(8))
            dst.writestr(info.filename, data)
    with pytest.raises(luodi.IntegrityError, match="sha256"):
        luodi.Session(bad, backend="onnxruntime")
    # the untouched reference target still loads: damage is reported per member
    with luodi.Session(bad, backend="reference") as s:
        assert s.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 5)


def test_newer_schema_asks_for_an_upgrade(cnn_package, tmp_path):
    path = tmp_path / "future.luodi"
    with zipfile.ZipFile(cnn_package) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "manifest.json":
                m = json.loads(data)
                m["schema"] = 99
                data = json.dumps(m).encode()
            dst.writestr(info.filename, data)
    with pytest.raises(luodi.PackageError, match="upgrade luodi"):
        luodi.Package(path)


def test_interrupted_write_leaves_nothing(tmp_path):
    dest = tmp_path / "out.luodi"

    class Boom(bytes):
        def __len__(self):  # fails while the zip is being written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_package(dest, {"format": "luodi"}, {"a.bin": b"1" * 10, "b.bin": Boom(b"xx")})
    assert list(tmp_path.iterdir()) == []


def test_failed_compile_keeps_the_previous_package(cnn_package, tmp_path):
    dest = tmp_path / "keep.luodi"
    dest.write_bytes(cnn_package.read_bytes())
    before = dest.read_bytes()
    # Tan on float64 has no ONNX Runtime kernel: the compile fails after the reference has run
    g = helper.make_graph(
        [helper.make_node("Tan", ["a"], ["b"], name="tan_node")],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [2])],
        [helper.make_tensor_value_info("b", TensorProto.DOUBLE, [2])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(luodi.UnsupportedOpError) as e:  # with --strict the first failure ends the compile
        luodi.compile(model, dest, targets=["reference", "onnxruntime"], strict=True)
    msg = str(e.value)
    assert "Tan" in msg and "tan_node" in msg and "onnxruntime" in msg and "nothing was written" in msg
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.luodi"]
    # without strict the reference is written and onnxruntime recorded as failed, with the same reason
    partial = luodi.compile(model, dest, targets=["reference", "onnxruntime"])
    failed = partial.find_target("onnxruntime")
    assert failed["status"] == "failed" and "tan_node" in failed["reason"] and failed["files"] == {}


def test_bad_model_files_are_model_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(luodi.ModelError, match="not an ONNX model"):
        luodi.compile(junk, tmp_path / "x.luodi")
    with pytest.raises(luodi.ModelError, match="no such model file"):
        luodi.compile(tmp_path / "absent.onnx", tmp_path / "x.luodi")
    broken = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["missing"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(luodi.ModelError, match="not a valid ONNX graph"):
        luodi.compile(broken, tmp_path / "x.luodi")
    assert not (tmp_path / "x.luodi").exists()
