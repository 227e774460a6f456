"""int8 I/O at the boundary (issue 16): int8 targets compiled to read and write the quantised integers, verified,
and run through Session with float or integer inputs and float or raw integer outputs. Real onnxruntime and
OpenVINO, a small CNN quantised by luodi's own int8 path."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from conftest import small_cnn
from luodi.quant.io import integer_io

TARGETS = ["onnxruntime:int8", "openvino:int8"]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(32)]
    out = tmp_path_factory.mktemp("int8io") / "cnn.luodi"
    return luodi.compile(
        small_cnn(), out, ["onnxruntime", *TARGETS], calibration=calibration, accuracy_budget="50%", int8_io=True
    )


@pytest.fixture
def x():
    return np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)


def test_manifest_carries_the_device_specs_and_verification_passes(pkg):
    assert [s.dtype for s in pkg.inputs] == ["float32"]  # the model's own boundary is unchanged
    for target in TARGETS:
        t = pkg.find_target(*target.split(":"))
        assert t["status"] == "verified", t.get("reason")
        ins, outs = pkg.target_io(t)
        for spec in (ins[0], outs[0]):
            assert spec.dtype == "uint8" and spec.is_quantised
            assert spec.scale > 0 and 0 <= spec.zero_point <= 255
        # the engine's file itself reads and writes integers: no float at its boundary
        graph = onnx.load_from_string(pkg.read(t["files"]["model.onnx"])) if "model.onnx" in t["files"] else None
        if graph is not None:
            assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
            assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert "io" not in pkg.find_target("onnxruntime", "fp32")


@pytest.mark.parametrize("target", TARGETS)
def test_float_in_equals_quantised_in_and_raw_out_dequantises(pkg, target, x):
    with luodi.Session(pkg, backend=target) as s, luodi.Session(pkg, backend=target, raw_int8=True) as raw:
        spec_in, spec_out = s.inputs[0], s.outputs[0]
        assert spec_in.dtype == "uint8" and spec_out.dtype == "uint8" and spec_out.scale > 0
        q = spec_in.quantise(x)
        assert q.dtype == np.uint8
        from_float = s.run({"x": x})["y"]
        from_int = s.run({"x": q})["y"]
        assert from_float.dtype == np.float32
        np.testing.assert_array_equal(from_float, from_int)
        got_raw = raw.run({"x": x})["y"]
        assert got_raw.dtype == np.uint8
        np.testing.assert_array_equal(spec_out.dequantise(got_raw), from_float)
        with luodi.Session(pkg, backend="onnxruntime:fp32") as ref:  # and it is the model, within int8 error
            want = ref.run({"x": x})["y"]
        assert np.abs(from_float - want).max() < 0.1 * np.abs(want).max() + 4 * spec_out.scale


def test_quantise_matches_onnx_quantizelinear():
    spec = luodi.TensorSpec("x", "uint8", (None,), scale=0.5, zero_point=10)
    halves = [-100.0, -5.25, 0.25, 0.75, 1.25, 60.0, 200.0]
    x = np.concatenate([halves, np.random.default_rng(3).normal(0, 40, 10000)]).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"])],
        initializer=[numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(10), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(spec.quantise(x), want)  # round half to even (0.25/0.5 -> 0), saturated


def test_integer_input_is_passed_through_without_a_copy(pkg, x):
    with luodi.Session(pkg, backend="onnxruntime:int8") as s:
        q = s.inputs[0].quantise(x)
        seen = []
        engine_run = s._engine.run

        def recording(feeds):
            seen.append(feeds["x"])
            return engine_run(feeds)

        s._engine.run = recording
        s.run({"x": q})
        s.run({"x": x})
    assert seen[0] is q and np.shares_memory(seen[0], q)
    assert seen[1].dtype == np.uint8 and not np.shares_memory(seen[1], x)  # float quantised at the boundary


def test_run_batch_and_forward_take_float_on_an_int8_target(pkg, x):
    with luodi.Session(pkg, backend="onnxruntime:int8") as s:
        whole = s.run({"x": x})["y"]
        rows = s.run_batch([x[0], x[1]], max_batch=2)
        np.testing.assert_array_equal(np.stack([r["y"] for r in rows]), whole)
        s.set_tensor("x", x)
        s.forward()
        np.testing.assert_array_equal(s.get_tensor("y"), whole)
        with pytest.raises(luodi.DTypeError):
            s.run({"x": x.astype(np.int32)})  # an integer of another type is neither float nor the device's


def test_int8_io_needs_an_int8_target(tmp_path):
    with pytest.raises(luodi.CompileError, match="int8_io"):
        luodi.compile(small_cnn(), tmp_path / "x.luodi", ["onnxruntime"], int8_io=True)


def _qdq_input(extra: str | None = None, per_axis: bool = False) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Relu -> y, optionally also x -> ``extra`` (a non-Q consumer)."""
    scale = np.full(3, 0.1, np.float32) if per_axis else np.float32(0.1)
    zero = np.zeros(3, np.uint8) if per_axis else np.uint8(0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], axis=1),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], axis=1),
        helper.make_node("Relu", ["xd"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    if extra:
        nodes.append(helper.make_node(extra, ["x"], ["e"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        outputs,
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_io_transform_and_its_refusals():
    model, ins, outs = integer_io(_qdq_input())
    assert ins == {"x": (pytest.approx(0.1), 0, "uint8")} and outs == {}  # a float output (Relu) stays float
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Relu"]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(luodi.CompileError, match=r"input 'x' cannot be an integer input: it also feeds \['Sigmoid'\]"):
        integer_io(_qdq_input(extra="Sigmoid"))
    with pytest.raises(luodi.CompileError, match="per-axis"):
        integer_io(_qdq_input(per_axis=True))


def test_an_input_no_quantizelinear_reads_stays_as_it_is():
    model = _qdq_input()
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 3]))
    graph.node.append(helper.make_node("Add", ["y", "k"], ["z"]))
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3]))
    out, ins, _ = integer_io(model)
    assert set(ins) == {"x"}
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.UINT8, TensorProto.FLOAT]


def _tampered(pkg, path, change):
    import json
    import zipfile

    src = zipfile.ZipFile(pkg.path)
    manifest = json.loads(src.read("manifest.json"))
    change(next(t for t in manifest["targets"] if "io" in t)["io"])
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = json.dumps(manifest).encode() if info.filename == "manifest.json" else src.read(info.filename)
            out.writestr(info, data)
    return path


def test_a_tampered_io_spec_is_refused(pkg, tmp_path):
    bad = _tampered(pkg, tmp_path / "zp.luodi", lambda io: io["inputs"][0].update(zero_point=999))
    with pytest.raises(luodi.PackageError, match="zero_point"):
        luodi.Package(bad).targets  # noqa: B018 - opening it is the check
    bad = _tampered(pkg, tmp_path / "name.luodi", lambda io: io["inputs"][0].update(name="other"))
    with pytest.raises(luodi.PackageError, match=r"io inputs \['other'\], not the model's \['x'\]"):
        luodi.Session(bad, backend="onnxruntime:int8")


def test_cli_compile_int8_io_and_info_json(tmp_path):
    import json

    from click.testing import CliRunner

    from luodi.cli.main import cli

    onnx.save(small_cnn(), tmp_path / "cnn.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((32, 3, 16, 16), dtype=np.float32))
    out = tmp_path / "cnn.luodi"
    args = ["compile", "-q", "-o", str(out), "-t", "onnxruntime:int8", "--calibration", str(tmp_path / "calib.npy")]
    res = CliRunner().invoke(cli, [*args, "--accuracy-budget", "50%", "--int8-io", str(tmp_path / "cnn.onnx")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["info", "--json", str(out)])
    assert res.exit_code == 0, res.output
    io = json.loads(res.output)["targets"][0]["io"]
    assert io["inputs"][0]["dtype"] == "uint8" and io["outputs"][0]["scale"] > 0


def test_preprocessing_ends_with_the_integer_input(tmp_path):
    from luodi.source import SourceModel

    pipeline = {
        "input": "x",
        "pre": [
            {"op": "decode_image", "mode": "RGB"},
            {"op": "normalize", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
            {"op": "to_tensor", "layout": "CHW", "dtype": "float32"},
        ],
        "post": [],
    }
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(32)]
    src = SourceModel(small_cnn(), "cnn", pipeline=pipeline)
    pkg = luodi.compile(
        src,
        tmp_path / "p.luodi",
        ["onnxruntime:int8"],
        calibration=calibration,
        accuracy_budget="50%",
        passes=None,
        int8_io=True,
    )
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with luodi.Session(pkg) as s:
        feeds, _ = s.pipeline.preprocess(image)
        spec = s.inputs[0]
        assert feeds["x"].dtype == np.uint8
        floats = image.transpose(2, 0, 1)[None].astype(np.float32) * (1.0 / np.array([255.0], np.float32))
        want = spec.quantise(floats)  # what normalize and to_tensor give, then QuantizeLinear's rounding
        np.testing.assert_array_equal(feeds["x"], want)
        np.testing.assert_array_equal(s.predict(image), s.run(feeds)["y"][0])


def test_luodi_verify_feeds_an_int8_io_target_floats_and_compares_floats(pkg, x):
    from luodi.verify.report import verify_package

    reports, _ = verify_package(pkg, [{"x": x}], targets=[pkg.find_target(*t.split(":")) for t in TARGETS])
    assert [r.target for r in reports] == TARGETS
    for r in reports:
        assert r.compared and r.passed, r.problem
        assert r.cosine > 0.99


@pytest.mark.slow
def test_served_int8_io_target_speaks_integers_with_scale_and_zero_point(pkg, x, tmp_path):
    """`luodi serve` on an int8-I/O target: the metadata gives each integer tensor's scale and zero point, and a
    KServe client that quantises with them gets the integers whose dequantised values Session.run returns."""
    th = pytest.importorskip("tritonclient.http")
    from serve_helpers import running

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(pkg.path, repo / "cnn.luodi")
    with luodi.Session(pkg, backend="onnxruntime:int8") as s:
        want = s.run({"x": x})["y"]
        (inp,), (out,) = s.inputs, s.outputs
    with running(repo, "-b", "onnxruntime:int8", "--poll-s", "0", log=tmp_path / "server.log") as srv:
        client = th.InferenceServerClient(srv.url)
        meta = client.get_model_metadata("cnn")
        (mi,), (mo,) = meta["inputs"], meta["outputs"]
        assert mi["datatype"] == mo["datatype"] == inp.np_dtype.name.upper() and inp.np_dtype.kind in "iu"
        assert mi["parameters"] == {"scale": inp.scale, "zero_point": inp.zero_point}
        assert mo["parameters"] == {"scale": out.scale, "zero_point": out.zero_point}
        p = mi["parameters"]
        q = np.clip(np.rint(x / p["scale"]) + p["zero_point"], *_limits(inp.np_dtype)).astype(inp.np_dtype)
        request = th.InferInput("x", list(q.shape), mi["datatype"])
        request.set_data_from_numpy(q, binary_data=True)
        raw = client.infer("cnn", [request]).as_numpy("y")
        with pytest.raises(th.InferenceServerException, match=r"quantise it first: round\(x / "):
            floats = th.InferInput("x", list(x.shape), "FP32")  # floats for the integer input: a 400 saying how
            floats.set_data_from_numpy(x, binary_data=True)
            client.infer("cnn", [floats])
    assert raw.dtype == out.np_dtype
    got = (raw.astype(np.float32) - mo["parameters"]["zero_point"]) * mo["parameters"]["scale"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 0.1


def _limits(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return info.min, info.max


@pytest.mark.slow
def test_detector_graph_pipeline_on_an_int8_io_target(tmp_path, monkeypatch):
    """nudenet's YOLOv8n (a graph pipeline: letterbox, model, decode, NMS) on an int8-I/O target: the letterboxed
    pixels reach the engine as uint8 (scale 1/255, so exact) and the detections match fp32's. Its quantisation
    pre-processing needs the fallback to ONNX's own shape inference (symbolic inference gives up on YOLOv8), and
    writes nothing into the working folder."""
    from luodi.zoo.images import skimage_picture

    workdir = tmp_path / "cwd"  # onnxruntime's shape inference dropped a 12 MB debug model into the working folder
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    pkg = luodi.compile(
        "zoo:yolov8n-nudenet",
        tmp_path / "yolo.luodi",
        ["onnxruntime", "onnxruntime:int8"],
        calibration="ai-benchmark",
        calib_samples=20,
        int8_io=True,
        accuracy_budget="99%",
        fallback=False,
    )
    assert list(workdir.iterdir()) == []
    picture = str(skimage_picture("astronaut"))
    # The boxes are what is asserted here; the target's own max-abs check on the raw head (pixel coordinates beside
    # class scores) sits near its tolerance with 20 calibration photos, so a failed verification is still loaded.
    with luodi.Session(pkg.path, backend="onnxruntime", precision="int8", allow_failed=True) as s:
        (spec,) = s.inputs
        assert (spec.dtype, spec.zero_point) == ("uint8", 0) and spec.scale == pytest.approx(1 / 255)
        got = s.predict(picture)
    with luodi.Session(pkg.path, backend="onnxruntime", precision="fp32") as s:
        want = s.predict(picture)
    assert want and [d.label for d in got[: len(want)]] == [d.label for d in want]
    for a, b in zip(want, got):
        x1, y1, x2, y2 = (
            max(a.box[0], b.box[0]),
            max(a.box[1], b.box[1]),
            min(a.box[2], b.box[2]),
            min(a.box[3], b.box[3]),
        )
        inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        assert inter / (area(a.box) + area(b.box) - inter) > 0.8, (a, b)
