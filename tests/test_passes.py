"""Graph passes: each one changes the graph as it says and leaves the outputs unchanged (1e-5 relative).

Every graph here is run before and after with onnxruntime (with its own optimisations off, so the
comparison sees the pass's graph as written) on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from luodi.compiler.passes import DEFAULT, available, resolve, run_passes

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(1.0, float(np.abs(a).max()))
        assert float(np.abs(a - b).max()) <= 1e-5 * scale, float(np.abs(a - b).max())


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32) if array.dtype == np.float64 else array, name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _x(*shape: object) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _y(*shape: object) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))


def test_registry_lists_every_pass_and_rejects_unknown_names():
    names = available()
    for name in ("infer-shapes", "fold-constants", "fold-batchnorm", "eliminate-identity", "eliminate-dead-nodes"):
        assert name in names and names[name]
    assert "fold-input-normalization" in names
    assert resolve("default") == list(DEFAULT) and resolve(None) == [] and resolve("none") == []
    with pytest.raises(luodi.CompileError, match="unknown graph pass 'fold-everything'.*fold-constants"):
        resolve(["fold-constants", "fold-everything"])


def test_infer_shapes_annotates_intermediate_tensors():
    w = _init("w", RNG.standard_normal((4, 3, 3, 3)))
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        [_x("n", 3, 8, 8)],
        [_y("n", 4, 6, 6)],
        [w],
    )
    assert not model.graph.value_info
    out, _, [rec] = run_passes(model, ["infer-shapes"])
    info = {v.name: v for v in out.graph.value_info}
    dims = [d.dim_value or d.dim_param for d in info["c"].type.tensor_type.shape.dim]
    assert dims == ["n", 4, 6, 6] and rec.nodes_before == rec.nodes_after == 2


def test_fold_constants_computes_constant_subgraphs_and_keeps_outputs():
    # y = x * (a + b) reshaped by a shape computed from constants: only Mul and Reshape remain
    nodes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.full((6,), 2.0, np.float32))),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["x", "ab"], ["m"]),
        helper.make_node("Constant", [], ["s0"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
        helper.make_node("Concat", ["minus1", "s0"], ["shape"], axis=0),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    inits = [_init("b", RNG.standard_normal(6)), numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    model = _model(nodes, [_x("n", 6)], [_y("n", 2, 3)], inits)
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    out, _, [rec] = run_passes(model, ["fold-constants"])
    assert _ops(out) == ["Mul", "Reshape"]
    assert rec.nodes_before == 6 and rec.nodes_after == 2 and "4 node(s) folded" in rec.notes[0]
    folded = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert folded["shape"].dtype == np.int64 and folded["shape"].tolist() == [-1, 2, 3]
    _assert_same(_run(model, {"x": x}), _run(out, {"x": x}))


def test_fold_constants_never_folds_random_or_dequantize_nodes():
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], shape=[4], seed=1.0),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"]),
        helper.make_node("Add", ["x", "w"], ["xw"]),
        helper.make_node("Mul", ["xw", "r"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2, 3, 4], np.uint8), "q"),
        numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
    ]
    model = _model(nodes, [_x(4)], [_y(4)], inits)
    out, _, _ = run_passes(model, ["fold-constants"])
    assert _ops(out) == _ops(model)


def test_fold_batchnorm_into_conv_and_gemm():
    c = 4
    bn_params = [_init(f"{p}{i}", v) for i in (1, 2) for p, v in zip(("g", "b", "m", "v"), _bn_stats(c))]
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g1", "b1", "m1", "v1"], ["bn1"], epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["g", "g2", "b2", "m2", "v2"], ["y"]),
    ]
    inits = [
        _init("w", RNG.standard_normal((c, 3, 3, 3))),
        _init("cb", RNG.standard_normal(c)),
        _init("fw", RNG.standard_normal((c, c))),
        _init("fb", RNG.standard_normal(c)),
        *bn_params,
    ]
    model = _model(nodes, [_x("n", 3, 8, 8)], [_y("n", c)], inits)
    x = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    out, _, recs = run_passes(model, ["fold-batchnorm", "eliminate-dead-nodes"])
    assert "BatchNormalization" not in _ops(out) and _ops(out).count("Conv") == 1
    assert recs[0].nodes_before == 7 and recs[0].nodes_after == 5 and "2 BatchNormalization" in recs[0].notes[0]
    assert recs[1].initializers_after < recs[1].initializers_before  # the old weights and BN stats are gone
    assert [o.name for o in out.graph.output] == ["y"]
    _assert_same(_run(model, {"x": x}), _run(out, {"x": x}))


def _bn_stats(c: int) -> list[np.ndarray]:
    return [
        RNG.uniform(0.5, 2.0, c),
        RNG.standard_normal(c),
        RNG.standard_normal(c),
        RNG.uniform(0.1, 3.0, c),
    ]


def test_fold_batchnorm_leaves_a_conv_whose_output_is_read_twice():
    g, b, m, v = (_init(n, a) for n, a in zip("gbmv", _bn_stats(2)))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Add", ["bn", "c"], ["y"]),
    ]
    model = _model(
        nodes, [_x(1, 1, 4, 4)], [_y(1, 2, 4, 4)], [_init("w", RNG.standard_normal((2, 1, 1, 1))), g, b, m, v]
    )
    out, _, _ = run_passes(model, ["fold-batchnorm"])
    assert "BatchNormalization" in _ops(out)


def test_eliminate_identity_and_dropout_and_dead_nodes():
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Relu", ["i"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Sigmoid", ["x"], ["unused"]),  # dead: nothing reads it
        helper.make_node("Identity", ["d"], ["y"]),  # a graph output: the Relu writes 'y' directly
    ]
    model = _model(nodes, [_x(2, 3)], [_y(2, 3)], [_init("spare", np.ones(3))])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    out, _, recs = run_passes(model, ["eliminate-identity", "eliminate-dead-nodes"])
    assert _ops(out) == ["Relu"] and out.graph.node[0].output[0] == "y" and out.graph.node[0].input[0] == "x"
    assert "2 Identity and 1 Dropout" in recs[0].notes[0]
    assert "1 dead node(s) and 1 unused initializer(s)" in recs[1].notes[0]
    _assert_same(_run(model, {"x": x}), _run(out, {"x": x}))


def _normalized_conv(pads: list[int], mean: list[float], std: list[float], explicit_pad: bool) -> onnx.ModelProto:
    w = _init("w", RNG.standard_normal((5, len(mean), 3, 3)))
    nodes = []
    src = "x"
    if explicit_pad:
        nodes.append(helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant"))
        src = "xp"
    nodes += [
        helper.make_node("Conv", [src, "w", "b"], ["c"], pads=pads, strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = [w, _init("b", RNG.standard_normal(5)), numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads")]
    return _model(nodes, [_x("n", len(mean), 16, 16)], [_y("n", 5, "h", "w")], inits)


def _pipeline(mean: list[float], std: list[float]) -> dict:
    return {
        "task": "classification",
        "input": "x",
        "pre": [
            {"op": "decode_image", "mode": "RGB"},
            {"op": "normalize", "mean": mean, "std": std},
            {"op": "to_tensor", "layout": "CHW", "dtype": "float32"},
        ],
        "post": [],
    }


@pytest.mark.parametrize(
    ("pads", "mean", "explicit_pad"),
    [
        ([0, 0, 0, 0], [120.0, 110.0, 100.0], False),  # no padding: any per-channel mean folds exactly
        ([1, 1, 1, 1], [127.0, 127.0, 127.0], False),  # Conv pads: moved into a Pad that pads with the mean
        ([0, 0, 0, 0], [127.0, 127.0, 127.0], True),  # a Pad node in front (EfficientNet's stem)
    ],
)
def test_fold_input_normalization_into_the_first_conv(pads, mean, explicit_pad):
    std = [58.0, 57.0, 57.5]
    model = _normalized_conv(pads, mean, std, explicit_pad)
    pixels = RNG.integers(0, 256, (2, 3, 16, 16)).astype(np.float32)
    normalised = (pixels - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    out, pipeline, [rec] = run_passes(model, ["fold-input-normalization"], _pipeline(mean, std))
    assert [s["op"] for s in pipeline["pre"]] == ["decode_image", "to_tensor"]
    assert pipeline["folded_into_model"] == {"input": "x", "mean": mean, "std": std}
    assert "folded into the first Conv" in rec.notes[0]
    if any(pads):
        assert _ops(out)[0] == "Pad"  # the conv's zero padding became padding with the mean
    if any(pads) or explicit_pad:
        pad = next(n for n in out.graph.node if n.op_type == "Pad")
        value = next(t for t in out.graph.initializer if t.name == pad.input[2])
        assert list(value.dims) == [] and numpy_helper.to_array(value) == np.float32(mean[0])  # a scalar, as Pad says
    _assert_same(_run(model, {"x": normalised}), _run(out, {"x": pixels}))


@pytest.mark.parametrize(
    ("pads", "mean", "explicit_pad"),
    [
        ([0, 0, 0, 0], [120.0, 110.0, 100.0], False),
        ([1, 1, 1, 1], [127.0] * 3, False),
        ([0, 0, 0, 0], [127.0] * 3, True),
    ],
)
def test_int8_engines_get_the_folded_normalization_taken_out_again_exactly(pads, mean, explicit_pad):
    # mnn:int8 and ncnn:int8 get the first Conv with its original weights and the normalisation as nodes in
    # front (MNN quantises a Conv's input symmetrically: pixels would lose a bit); outputs must not change.
    from luodi.backends._unfold import unfold_input_normalization

    std = [58.0, 57.0, 57.5]
    model = _normalized_conv(pads, mean, std, explicit_pad)
    pixels = RNG.integers(0, 256, (2, 3, 16, 16)).astype(np.float32)
    folded, pipeline, _ = run_passes(model, ["fold-input-normalization"], _pipeline(mean, std))
    back = unfold_input_normalization(folded, pipeline["folded_into_model"])
    assert _ops(back)[:2] == ["Sub", "Mul"] and _ops(folded)[0] != "Sub"  # the caller's graph is not modified
    conv = next(n for n in back.graph.node if n.op_type == "Conv")
    weights = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    np.testing.assert_allclose(weights[conv.input[1]], numpy_helper.to_array(model.graph.initializer[0]), rtol=1e-6)
    _assert_same(_run(folded, {"x": pixels}), _run(back, {"x": pixels}))
    assert unfold_input_normalization(model, None) is model


def test_fold_input_normalization_refuses_what_it_cannot_fold_exactly():
    mean, std = [120.0, 110.0, 100.0], [58.0, 57.0, 57.5]
    model = _normalized_conv([1, 1, 1, 1], mean, std, False)
    spec = _pipeline(mean, std)
    out, pipeline, [rec] = run_passes(model, ["fold-input-normalization"], spec)
    assert pipeline == spec and _ops(out) == _ops(model)
    assert "channel means differ" in rec.notes[0]
    _, same, [rec] = run_passes(model, ["fold-input-normalization"], None)
    assert same is None and "nothing to fold" in rec.notes[0]


def test_default_passes_on_efficientnet_shrink_the_graph_and_keep_outputs(effnet_source):
    model = effnet_source.model
    out, pipeline, recs = run_passes(model, "default", effnet_source.pipeline)
    assert [r.name for r in recs] == list(DEFAULT)
    assert len(out.graph.node) < len(model.graph.node) / 3  # 456 -> 115 nodes: the padding arithmetic folds
    assert not any(n.op_type == "Constant" for n in out.graph.node)  # weights and constants are initializers
    assert "normalize" not in [s["op"] for s in pipeline["pre"]]
    pixels = RNG.integers(0, 256, (2, 3, 224, 224)).astype(np.float32)
    _assert_same(_run(model, {"images": (pixels - 127.0) / 128.0}), _run(out, {"images": pixels}))


def test_compile_records_the_passes_and_cli_lists_them(tmp_path, cnn_model):
    from click.testing import CliRunner

    from luodi.cli.main import cli

    pkg = luodi.compile(cnn_model, tmp_path / "a.luodi", targets=["onnxruntime"])
    assert [r["name"] for r in pkg.manifest["passes"]] == list(DEFAULT)
    bare = luodi.compile(cnn_model, tmp_path / "b.luodi", targets=["onnxruntime"], passes=None)
    assert bare.manifest["passes"] == []
    runner = CliRunner()
    res = runner.invoke(cli, ["compile", "-o", str(tmp_path / "c.luodi"), "--passes", _onnx_file(tmp_path, cnn_model)])
    assert res.exit_code == 0, res.output
    assert "graph passes" in res.output and "fold-constants" in res.output and "->" in res.output
    res = runner.invoke(cli, ["info", str(pkg.path)])
    assert res.exit_code == 0 and "graph passes:" in res.output, res.output
    res = runner.invoke(cli, ["passes"])
    assert res.exit_code == 0 and "fold-input-normalization" in res.output
    res = runner.invoke(
        cli, ["compile", "-o", str(tmp_path / "d.luodi"), "--pass", "nope", _onnx_file(tmp_path, cnn_model)]
    )
    assert res.exit_code == 2 and "unknown graph pass 'nope'" in res.output
    assert not (tmp_path / "d.luodi").exists()


def _onnx_file(tmp_path, model) -> str:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return str(path)


def test_dead_initializers_listed_as_graph_inputs_leave_no_required_input() -> None:
    """An IR-3 style model lists every initializer as a graph input; removing an unused one removes its input too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from luodi.compiler.passes import run_passes
    from luodi.tensor import specs_from_onnx

    used = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    unused = numpy_helper.from_array(np.zeros((3,), np.int64), "stale")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("stale", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [used, unused],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=3)
    onnx.checker.check_model(model)
    out, _, _ = run_passes(model, ["eliminate-dead-nodes"], None)
    inputs, _ = specs_from_onnx(out)
    assert [s.name for s in inputs] == ["x"]
    assert [i.name for i in out.graph.input] == ["x", "w"]
