"""Converters at the shapes users run: representative shapes reach pnnx (ncnn), MNN's trial run and OpenVINO,
every free axis stays dynamic, converter failures say why in one line, and a too-new IR version is lowered."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from luodi.backends import CompileOptions, LoadOptions, get_backend
from luodi.backends.onnx_compat import min_ir_version, with_ir_version_at_most
from luodi.backends.shapes import primary_shapes, second_shapes
from luodi.errors import BackendError, CompileError
from luodi.tensor import specs_from_onnx

HAVE = {
    "ncnn": importlib.util.find_spec("ncnn") is not None and importlib.util.find_spec("pnnx") is not None,
    "mnn": importlib.util.find_spec("MNN") is not None,
    "openvino": importlib.util.find_spec("openvino") is not None,
}


def engine_param(name: str):  # noqa: ANN201
    return pytest.param(name, marks=pytest.mark.skipif(not HAVE[name], reason=f"{name} is not installed"))


ENGINES = [engine_param(n) for n in ("ncnn", "mnn", "openvino")]


def _model(nodes, inputs, outputs, inits, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def nhwc_model(ir_version: int = 8) -> onnx.ModelProto:
    """x [N,H,W,3] -> Transpose to NCHW -> Conv 3x3 stride 2 -> Relu: free batch, height and width."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h2", "w2"])
    return _model(nodes, [x], [y], [w], ir_version)


def ocr_model() -> onnx.ModelProto:
    """x [N,3,8,W] -> Conv(8x1) [N,6,1,W] -> Squeeze -> Transpose: [W,N,6], the layout of a CTC recogniser."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 3, 8, 1)).astype(np.float32), "w")
    axis = numpy_helper.from_array(np.array([2], np.int64), "axis")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Squeeze", ["c", "axis"], ["s"]),
        helper.make_node("Transpose", ["s"], ["y"], perm=[2, 0, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["W", "N", 6])
    return _model(nodes, [x], [y], [w, axis])


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def compile_and_load(backend: str, model: onnx.ModelProto, shapes=()):  # noqa: ANN001, ANN201
    b = get_backend(backend)
    return b.load(b.compile(model, CompileOptions(shapes=tuple(shapes))), LoadOptions(threads=1))


def assert_matches_onnxruntime(engine, model, shape_sets) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    for shapes in shape_sets:
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        want, got = ort_run(model, feeds), engine.run(feeds)
        for name, ref in want.items():
            assert got[name].shape == ref.shape, (shapes, name, got[name].shape, ref.shape)
            np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=1e-4)


# -- the shape sets ---------------------------------------------------------------------------------------------------
def test_primary_and_second_shapes_differ_on_every_free_axis():
    inputs, _ = specs_from_onnx(nhwc_model())
    given = CompileOptions(shapes=({"x": (1, 32, 48, 3)}, {"x": (1, 40, 48, 3)}))
    primary = primary_shapes(inputs, given)
    assert primary == {"x": (1, 32, 48, 3)}
    # only the axes the given sets move are moved: a free dim may really run at one size only
    assert second_shapes(inputs, primary, given) == {"x": (1, 40, 48, 3)}
    later = CompileOptions(shapes=(*given.shapes, {"x": (2, 32, 48, 3)}))
    assert second_shapes(inputs, primary, later) == {"x": (2, 40, 48, 3)}
    assert second_shapes(inputs, primary, CompileOptions(shapes=given.shapes[:1])) is None
    # without shapes: free dims at 1, as before
    assert primary_shapes(inputs, CompileOptions()) == {"x": (1, 1, 1, 3)}


@pytest.mark.parametrize(
    ("shape", "words"),
    [((1, 32, 32, 4), "fixes at 3"), ((1, 32, 32), "3 dims"), ((1, 0, 32, 3), "size 0"), (None, "no shape")],
)
def test_shapes_that_do_not_fit_the_model_are_a_compile_error(shape, words):
    inputs, _ = specs_from_onnx(nhwc_model())
    sets = ({"x": shape},) if shape is not None else ({"other": (1, 2)},)
    with pytest.raises(CompileError, match=words):
        primary_shapes(inputs, CompileOptions(shapes=sets))


# -- every engine at two sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ENGINES)
def test_nhwc_model_with_free_height_and_width_matches_onnxruntime_at_two_sizes(backend):
    """Traced at 1x1 the model cannot run (pnnx died of SIGSEGV, MNN's trial run failed); at the representative
    shapes it compiles and stays dynamic in batch, height and width."""
    model = nhwc_model()
    shapes = ({"x": (1, 32, 48, 3)}, {"x": (2, 40, 24, 3)})
    engine = compile_and_load(backend, model, shapes)
    try:
        assert_matches_onnxruntime(engine, model, [*shapes, {"x": (3, 17, 65, 3)}])
    finally:
        engine.close()


@pytest.mark.parametrize("backend", ENGINES)
def test_ocr_layout_with_batch_on_axis_1_matches_onnxruntime(backend):
    """[W, N, C] outputs: ncnn runs a batch item by item and used to stack the items on axis 0 ((74,1,6) for
    (37,2,6))."""
    model = ocr_model()
    shapes = ({"x": (1, 3, 8, 60)}, {"x": (2, 3, 8, 37)})
    engine = compile_and_load(backend, model, shapes)
    try:
        assert_matches_onnxruntime(engine, model, shapes)
    finally:
        engine.close()


@pytest.mark.skipif(not HAVE["ncnn"], reason="ncnn/pnnx are not installed")
def test_fixed_width_crnn_stacks_a_batch_on_the_axis_its_output_names():
    """A CRNN with a fixed width ([T, batch, C] logits): nothing moves but the batch, so pnnx names no batch axis for
    the output; the output's own 'N' dimension says where the items go."""
    model = ocr_model()
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 60
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 60
    shapes = ({"x": (1, 3, 8, 60)}, {"x": (3, 3, 8, 60)})
    engine = compile_and_load("ncnn", model, shapes)
    try:
        assert_matches_onnxruntime(engine, model, shapes)
    finally:
        engine.close()


@pytest.mark.skipif(not HAVE["ncnn"], reason="ncnn/pnnx are not installed")
@pytest.mark.slow
def test_ppocr_v4_recogniser_on_ncnn_is_right_at_two_widths():
    """The real PP-OCRv4 recogniser (rapidocr-onnxruntime wheel): its height is declared free but is 48. Traced at a
    second height pnnx's Reshape failed; traced at a second batch of 4 pnnx converted it wrongly (0.67 max error on
    the character probabilities, silently) or died."""
    path = importlib.util.find_spec("rapidocr_onnxruntime")
    if path is None:
        pytest.skip("rapidocr-onnxruntime is not installed (make .venv installs it)")
    from pathlib import Path

    model = onnx.load(Path(path.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx")
    shapes = ({"x": (1, 3, 48, 320)}, {"x": (2, 3, 48, 160)})
    engine = compile_and_load("ncnn", model, shapes)
    try:
        assert_matches_onnxruntime(engine, model, shapes)
    finally:
        engine.close()


# -- converter failures read ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE["ncnn"], reason="ncnn/pnnx are not installed")
def test_pnnx_crash_is_a_compile_error_with_the_cause_from_its_log():
    """Without shapes the NHWC model is traced at 1x1: pnnx dies of SIGSEGV after onnxruntime told it why."""
    with pytest.raises(CompileError) as info:
        get_backend("ncnn").compile(nhwc_model(), CompileOptions())
    message = str(info.value)
    assert "SIGSEGV" in message and "Invalid input shape" in message and "Conv" in message, message
    assert "inputshape=[1,1,1,3]f32" in message
    assert "\n" not in message


@pytest.mark.skipif(not HAVE["ncnn"], reason="ncnn/pnnx are not installed")
def test_a_param_ncnn_cannot_load_names_the_layer_not_a_package_to_recompile():
    """A Clip whose bound is computed at run time: pnnx writes a two-input Clip, ncnn's Clip takes one blob."""
    k = numpy_helper.from_array(np.array(0.5, np.float32), "k")
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
        helper.make_node("Mul", ["mx", "k"], ["lo"]),
        helper.make_node("Clip", ["x", "lo"], ["y"]),
    ]
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16]) for n in "xy")
    model = _model(nodes, [x], [y], [k])
    with pytest.raises(CompileError, match=r"cannot load the model pnnx wrote: .*one_blob_only layer \d+ \(Clip '"):
        get_backend("ncnn").compile(model, CompileOptions(shapes=({"x": (1, 16)},)))


@pytest.mark.skipif(not HAVE["mnn"], reason="MNN is not installed")
def test_mnn_trial_run_failure_names_the_shapes_and_what_mnn_said():
    w = numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")  # 5 in-channels for a 3-channel input
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"])], [x], [helper.make_tensor_value_info("y", 1, None)], [w]
    )
    with pytest.raises(BackendError) as info:
        get_backend("mnn").compile(model, CompileOptions())
    message = str(info.value)
    assert "[1, 3, 8, 8]" in message and "Compute Shape Error" in message, message


@pytest.mark.skipif(not HAVE["openvino"], reason="openvino is not installed")
def test_openvino_conversion_failure_gives_the_reason():
    w = numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="bad_conv")
    model = _model([node], [x], [helper.make_tensor_value_info("y", 1, None)], [w])
    with pytest.raises(BackendError, match=r"'bad_conv' \(Data batch channel count \(3\) does not match"):
        get_backend("openvino").compile(model, CompileOptions())


@pytest.mark.skipif(not HAVE["openvino"], reason="openvino is not installed")
def test_openvino_fp32_does_not_quantise_activations_of_a_weight_compressed_matmul():
    """int8 weights + Cast + Mul (how int8-weight transformers ship): OpenVINO's CPU plugin quantised the
    activations on the fly at the f32 hint (0.10 max error on this layer, verification failed)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (64, 64)).astype(np.int8), "w_q")
    scale = numpy_helper.from_array((rng.uniform(0.5, 1.5, 64) / 127).astype(np.float32), "w_scale")
    nodes = [
        helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w_f", "w_scale"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 64])
    model = _model(nodes, [x], [y], [w, scale])
    engine = compile_and_load("openvino", model, ({"x": (1, 16, 64)}, {"x": (2, 9, 64)}))
    try:
        assert engine.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
        assert_matches_onnxruntime(engine, model, [{"x": (1, 16, 64)}, {"x": (2, 9, 64)}])
    finally:
        engine.close()


def test_reference_failure_at_a_bad_shape_is_a_backend_error_naming_the_shapes():
    from luodi.backends.reference import ReferenceEngine

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    model = _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3])], [x], [vi_any("y")], [])
    engine = ReferenceEngine(model)
    assert engine.run({"x": np.ones((1, 3, 5, 5), np.float32)})["y"].shape == (1, 3, 3, 3)
    with pytest.raises(BackendError, match=r"inputs \{'x': \[1, 3, 1, 1\]\}"):
        engine.run({"x": np.ones((1, 3, 1, 1), np.float32)})


def vi_any(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


# -- IR version ---------------------------------------------------------------------------------------------------
def test_ir_version_is_lowered_only_when_the_model_uses_nothing_newer():
    model = nhwc_model(ir_version=14)
    lowered = with_ir_version_at_most(model, 13)
    assert lowered is not None and lowered.ir_version == 13 and model.ir_version == 14
    assert lowered.graph == model.graph
    assert with_ir_version_at_most(model, 14) is model
    # an int4 weight needs IR 10: it cannot go down to 9
    int4 = helper.make_tensor("q", TensorProto.INT4, [2], [1, 2])
    model.graph.initializer.append(int4)
    assert min_ir_version(model) == 10
    assert with_ir_version_at_most(model, 9) is None
    # opset 21 needs IR 10
    newer = nhwc_model(ir_version=14)
    newer.opset_import[0].version = 21
    assert min_ir_version(newer) == 10


@pytest.mark.skipif(not HAVE["ncnn"], reason="ncnn/pnnx are not installed")
def test_ncnn_compiles_an_ir_14_model_by_lowering_it():
    """pnnx's bundled reader stops at IR 13 ("Unsupported model IR version: 14", then SIGSEGV)."""
    model = nhwc_model(ir_version=14)
    shapes = ({"x": (1, 32, 32, 3)}, {"x": (1, 24, 40, 3)})
    engine = compile_and_load("ncnn", model, shapes)
    try:
        assert_matches_onnxruntime(engine, model, shapes)
    finally:
        engine.close()
