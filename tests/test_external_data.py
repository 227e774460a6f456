"""Models whose weights exceed protobuf's 2 GB limit are stored and compiled as ONNX external data (luodi.onnx_io).

Building a real 2 GB model in every test run would cost minutes and ~20 GB of memory, so these tests lower the
limit with ``LUODI_EXTERNAL_DATA_ABOVE``: the same code path (graph + ``model.onnx.data`` members, engines reading
the split model) runs on a model of a few hundred kB. ``benchmarks/large_model.py`` runs a real 2.25 GB model.
"""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import luodi
from conftest import installed
from luodi import onnx_io

ENGINES = ["onnxruntime", "reference", "openvino", "ncnn", "mnn"]


def weighty_cnn() -> onnx.ModelProto:
    """Conv(3->32) -> Relu -> Conv(32->64) -> Relu -> pool -> Gemm(64->10): 80 kB of weights, dynamic batch."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 3, 3, 3)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),  # 128 B: stays inline
        numpy_helper.from_array((rng.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((10, 64)) * 0.1).astype(np.float32), "fw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "weighty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUODI_EXTERNAL_DATA_ABOVE", "10000")


def test_split_and_join_round_trip(small_limit: None) -> None:
    model = weighty_cnn()
    model.producer_name, model.doc_string, model.graph.doc_string = "maker", "about", "the graph"
    model.metadata_props.add(key="licence", value="MIT")
    before = model.SerializeToString()
    assert onnx_io.is_large(model)
    members = onnx_io.to_members(model)
    assert set(members) == {"model.onnx", "model.onnx.data"}
    assert model.SerializeToString() == before  # the caller's model is never touched
    graph = onnx.load_model_from_string(members["model.onnx"])
    external = {t.name for t in graph.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w1", "w2", "fw"}  # b1 (128 bytes) stays inside the graph
    assert len(members["model.onnx"]) < 2000 and len(members["model.onnx.data"]) >= 4 * (32 * 27 + 64 * 288 + 640)
    back = onnx_io.from_members(members["model.onnx"], members.__getitem__)
    assert back.SerializeToString() == before  # every field of model and graph survives, not only the weights
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_small_models_stay_one_file() -> None:
    model = weighty_cnn()
    assert not onnx_io.is_large(model)
    assert list(onnx_io.to_members(model)) == ["model.onnx"]


def test_package_stores_external_data_and_every_engine_runs_it(small_limit: None, tmp_path) -> None:
    model = weighty_cnn()
    targets = [e for e in ENGINES if installed(e)]
    assert {"onnxruntime", "reference"} <= set(targets)
    pkg = luodi.compile(model, tmp_path / "w.luodi", targets=targets)
    with zipfile.ZipFile(pkg.path) as zf:
        sizes = {i.filename: i.file_size for i in zf.infolist()}
    assert sizes["model.onnx"] < 2000 and sizes["model.onnx.data"] > 75_000
    ort_files = pkg.find_target("onnxruntime")["files"]
    assert ort_files["model.onnx.data"] == "model.onnx.data"  # ORT's copy of the weights is the canonical one, once
    for entry in pkg.targets:
        assert entry["verification"]["passed"], entry
    canonical = pkg.model()  # joined back from the two members
    assert not onnx_io.uses_external(canonical)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ReferenceEvaluator(canonical).run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-6)
    for target in targets:
        with luodi.Session(pkg.path, backend=target) as s:
            np.testing.assert_allclose(s.run({"x": x})["y"], want, rtol=1e-4, atol=1e-5, err_msg=target)


def test_save_writes_graph_and_data_an_engine_reads(small_limit: None, tmp_path) -> None:
    import onnxruntime as ort

    files = onnx_io.save(weighty_cnn(), tmp_path / "m.onnx")
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    x = np.ones((1, 3, 16, 16), np.float32)
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ReferenceEvaluator(weighty_cnn()).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    # and the ONNX frontend reads such a file back whole
    pkg = luodi.compile(str(files[0]), tmp_path / "m.luodi", targets=["onnxruntime"])
    assert pkg.name == "m"


@pytest.mark.parametrize(
    "location, message",
    [("../outside.bin", "only a file beside the graph"), ("/etc/passwd", "only a file beside the graph")],
)
def test_external_data_never_reaches_outside_the_package(small_limit: None, location: str, message: str) -> None:
    graph, data = onnx_io.split(weighty_cnn())
    model = onnx.load_model_from_string(graph)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    with pytest.raises(luodi.LuodiError, match=message):
        onnx_io.attach(model, lambda _loc: data)


def test_truncated_data_member_is_a_clear_error(small_limit: None, tmp_path) -> None:
    graph, data = onnx_io.split(weighty_cnn())
    with pytest.raises(luodi.LuodiError, match="truncated"):
        onnx_io.from_members(graph, lambda _loc: data[: len(data) // 2])


def test_export_of_a_module_over_the_limit_goes_through_a_file(small_limit: None, tmp_path) -> None:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    x = torch.randn(4, 64)
    pkg = luodi.export(module, (x[:1],), out=tmp_path / "mlp.luodi", targets=["onnxruntime", "openvino"])
    with zipfile.ZipFile(pkg.path) as zf:
        assert "model.onnx.data" in zf.namelist()  # 41 kB of weights over the lowered 10 kB limit
    with torch.no_grad():
        want = module(x).numpy()
    for target in ("onnxruntime", "openvino"):
        with luodi.Session(pkg.path, backend=target) as s:
            got = s.run({s.inputs[0].name: x.numpy()})
            np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-4, atol=1e-5, err_msg=target)


def test_onnxruntime_takes_weights_as_views_when_one_is_over_2_gb(small_limit: None) -> None:
    """The path ORT needs for a single weight over 2 GB (it refuses to embed one from an in-memory file): every
    external weight handed over as an OrtValue viewing the package's bytes. Run here on a small model."""
    import onnxruntime as ort

    from luodi.backends.onnxruntime import _external_ortvalues

    graph, data = onnx_io.split(weighty_cnn())
    data = bytes(data)
    names, values = _external_ortvalues(ort, graph, data)
    assert sorted(names) == ["fw", "w1", "w2"]
    so = ort.SessionOptions()
    so.add_external_initializers(names, values)
    sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ReferenceEvaluator(weighty_cnn()).run(None, {"x": x})[0]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-6)
