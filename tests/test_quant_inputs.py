"""int8 on the models users bring: an old opset upgraded (or refused) before any calibration, image-folder
calibration of a model without a pipeline through --preprocess, and pre-quantised (QDQ) sources."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import luodi
from conftest import small_cnn
from luodi.errors import CompileError, InputError
from luodi.pipeline import Pipeline
from luodi.quant.data import ai_benchmark_images
from luodi.quant.opset import default_opset, for_quantisation
from luodi.quant.preprocess import pipeline_spec
from luodi.tensor import TensorSpec, specs_from_onnx


def calibration_array(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)


def target(pkg: luodi.Package, backend: str, precision: str) -> dict:
    return next(t for t in pkg.targets if t["backend"] == backend and t["precision"] == precision)


# -- old opsets -------------------------------------------------------------------------------------------------
def test_opset_9_model_is_upgraded_and_its_int8_target_verifies(tmp_path):
    """DequantizeLinear's per-channel axis needs opset 13: an opset-9 graph failed when the engine loaded the QDQ
    graph, after the whole calibration."""
    model = small_cnn()
    model.opset_import[0].version = 9
    said: list[str] = []
    pkg = luodi.compile(
        model, tmp_path / "op9.luodi", targets=["onnxruntime:int8"], calibration=calibration_array(), log=said.append
    )
    t = target(pkg, "onnxruntime", "int8")
    assert t["verification"]["passed"], t["verification"]
    assert t["quantization"]["opset"] == {"source": 9, "quantised": 13}
    upgrade = next(i for i, m in enumerate(said) if "opset 9 to 13" in m)
    assert upgrade < next(i for i, m in enumerate(said) if m.startswith("calibrating"))


def test_opset_that_cannot_be_upgraded_is_refused_before_reading_any_data(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NoSuchOp", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    start = time.perf_counter()
    with pytest.raises(CompileError, match="opset 9 and onnx's version converter could not upgrade it"):
        for_quantisation(model)
    assert time.perf_counter() - start < 1.0
    # through the PTQ: refused before the (absent) calibration folder is even looked at
    from luodi.quant import PTQ

    with pytest.raises(CompileError, match="operator set 13"):
        PTQ(model, specs_from_onnx(model)[0], str(tmp_path / "no-such-folder"))


def test_opset_13_model_is_left_alone():
    model = small_cnn()
    assert default_opset(model) == 17 and for_quantisation(model) is model


# -- --preprocess -----------------------------------------------------------------------------------------------------
def test_preprocess_text_is_the_pipeline_a_deployment_engineer_means():
    nchw = [TensorSpec("x", "float32", ("N", 3, 4, 6))]
    spec = pipeline_spec("resize=4,6; scale=1/255; mean=0.5,0.25,0; std=0.5", nchw)
    img = np.random.default_rng(0).integers(0, 256, (9, 7, 3)).astype(np.uint8)
    got = Pipeline(spec, nchw).preprocess(img)[0]["x"]
    from PIL import Image

    resized = np.asarray(Image.fromarray(img).resize((6, 4), Image.BILINEAR), np.float32)
    want = ((resized / 255 - [0.5, 0.25, 0]) / 0.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # NHWC is read off the input's shape; bgr flips the channels; the fixed size is the default resize
    nhwc = [TensorSpec("img", "float32", (1, 5, 5, 3))]
    spec = pipeline_spec("color=bgr", nhwc)
    out = Pipeline(spec, nhwc).preprocess(img)[0]["img"]
    assert out.shape == (1, 5, 5, 3)
    rgb = np.asarray(Image.fromarray(img).resize((5, 5), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(out[0], rgb[:, :, ::-1])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("size=224", "no key 'size'"),
        ("resize", "not KEY=VALUE"),
        ("scale=1/0", "expected numbers"),
        ("mean=1,2", "1 or 3 values"),
        ("color=gray", "1 channel"),
        ("layout=nc", "nchw or nhwc"),
        ("std=0", "cannot be 0"),
    ],
)
def test_bad_preprocess_text_is_an_input_error(text, words):
    with pytest.raises(InputError, match=words):
        pipeline_spec(text, [TensorSpec("x", "float32", ("N", 3, 16, 16))])


def test_free_height_needs_a_resize():
    with pytest.raises(InputError, match="resize=H,W"):
        pipeline_spec("scale=1/255", [TensorSpec("x", "float32", ("N", 3, "H", "W"))])


def test_image_folder_calibrates_a_model_without_a_pipeline(tmp_path):
    """Refused before: the model has no pipeline to turn the images into tensors."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in ai_benchmark_images()[:12]:
        shutil.copy(path, folder / path.name)
    model = small_cnn()
    with pytest.raises(InputError, match="--preprocess"):
        luodi.compile(model, tmp_path / "refused.luodi", targets=["onnxruntime:int8"], calibration=str(folder))
    pkg = luodi.compile(
        model,
        tmp_path / "cnn.luodi",
        targets=["onnxruntime:int8"],
        calibration=str(folder),
        preprocess="resize=16,16;layout=nchw;scale=1/255;mean=0.485,0.456,0.406;std=0.229,0.224,0.225",
    )
    t = target(pkg, "onnxruntime", "int8")
    assert t["quantization"]["calibration"]["samples"] == 12
    assert t["verification"]["passed"], t["verification"]
    assert pkg.manifest["pipeline"] is None  # calibration only: the package gains no pipeline


@pytest.mark.slow
def test_cli_compile_takes_preprocess_and_reports_a_bad_one_in_one_line(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in ai_benchmark_images()[:6]:
        shutil.copy(path, folder / path.name)
    onnx.save(small_cnn(), tmp_path / "cnn.onnx")

    def cli(preprocess: str) -> subprocess.CompletedProcess:
        args = ["compile", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "cnn.luodi"), "-t", "onnxruntime:int8"]
        args += ["--calibration", str(folder), "--preprocess", preprocess]
        return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=300)

    bad = cli("resize=16,16;size=3")
    assert bad.returncode != 0 and "no key 'size'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    good = cli("resize=16,16;scale=1/255;mean=0.5;std=0.25")
    assert good.returncode == 0, good.stderr
    assert luodi.Package(tmp_path / "cnn.luodi").find_target("onnxruntime", "int8")["verification"]["passed"]


def test_preprocess_without_an_int8_target_is_refused(tmp_path):
    with pytest.raises(CompileError, match="no target is int8"):
        luodi.compile(small_cnn(), tmp_path / "x.luodi", targets=["onnxruntime"], preprocess="scale=1/255")


# -- pre-quantised sources -------------------------------------------------------------------------------------
def _conv_model() -> onnx.ModelProto:
    from onnx import numpy_helper

    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.2, "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 24])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 24, 24])
    model = helper.make_model(
        helper.make_graph(nodes, "f", [x], [y], initializer=[w1, w2]), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 7
    return model


@pytest.fixture(scope="module")
def qdq_source(tmp_path_factory) -> onnx.ModelProto:
    """A model pre-quantised the way users bring them: onnxruntime's quantize_static, QDQ, per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": rng.standard_normal((1, 3, 24, 24)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    folder = tmp_path_factory.mktemp("qdq")
    onnx.save(_conv_model(), folder / "float.onnx")
    quantize_static(
        folder / "float.onnx",
        folder / "qdq.onnx",
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(folder / "qdq.onnx")


def test_qdq_source_is_verified_against_its_qdq_graph_with_the_int8_tolerance(qdq_source, tmp_path):
    """The reference could not evaluate DequantizeLinear below opset 19; OpenVINO runs the QDQ graph in int8 kernels,
    one quantisation step (0.085 here) from the reference's float simulation: outside fp32's 1e-4 relative."""
    from luodi.quant.source import quantised_format

    assert quantised_format(qdq_source) == "qdq" and quantised_format(_conv_model()) is None
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3, 24, 24)).astype(np.float32)} for i in range(2)]
    targets = ["onnxruntime", *(["openvino"] if importlib.util.find_spec("openvino") else [])]
    pkg = luodi.compile(qdq_source, tmp_path / "qdq.luodi", targets=targets, samples=samples)
    for t in pkg.targets:
        ver = t["verification"]
        assert ver["passed"], (t["backend"], ver)
        assert ver["source"] == "pre-quantised (qdq)" and ver["tolerance_class"] == "int8"
        assert ver["tolerance"]["rel_max_abs"] == 0.2
