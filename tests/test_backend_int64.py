"""int64 at an engine's boundary: MNN computes int64 tensors in int32 and read an int64 buffer as int32 pairs
([1, 2, 3, 4] as [1, 0, 2, 0]); luodi narrows int64 inputs (checked to fit) and widens int64 outputs back."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from luodi.backends import CompileOptions, LoadOptions, get_backend
from luodi.errors import InputError

if importlib.util.find_spec("MNN") is None:
    pytest.skip("MNN is not installed (pip install 'luodi[mnn]')", allow_module_level=True)

VOCAB, WIDTH = 50, 8


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "m", inputs, outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def gather_model() -> onnx.ModelProto:
    """An embedding lookup: ids [b, s] int64 -> table[ids] [b, s, 4], and ids + 1 as an int64 output."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["y"], axis=0),
        helper.make_node("Add", ["ids", "one"], ["z"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 4]),
        helper.make_tensor_value_info("z", TensorProto.INT64, ["b", "s"]),
    ]
    return _model(nodes, [ids], outs, [table, one])


def token_model() -> onnx.ModelProto:
    """A transformer-like encoder head: token and position embeddings (positions from Shape/Range in int64), an
    int64 attention mask, a masked mean, logits and the arg-max label (int64)."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def i64(name: str, *values: int) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    inits = [w("tok", VOCAB, WIDTH), w("pos", 64, WIDTH), w("w1", WIDTH, WIDTH), w("w2", WIDTH, 3)]
    inits += [i64("one_idx", 1), i64("zero"), i64("step", 1), i64("last", -1), i64("axis1", 1)]
    inits[-4] = numpy_helper.from_array(np.array(0, np.int64), "zero")
    inits[-3] = numpy_helper.from_array(np.array(1, np.int64), "step")
    n = helper.make_node
    nodes = [
        n("Gather", ["tok", "input_ids"], ["te"], axis=0),
        n("Shape", ["input_ids"], ["shape"]),
        n("Gather", ["shape", "one_idx"], ["seq1"], axis=0),
        n("Squeeze", ["seq1"], ["seq"]),
        n("Range", ["zero", "seq", "step"], ["positions"]),
        n("Gather", ["pos", "positions"], ["pe"], axis=0),
        n("Add", ["te", "pe"], ["e"]),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["maskf", "last"], ["mask3"]),
        n("MatMul", ["e", "w1"], ["h0"]),
        n("Tanh", ["h0"], ["h"]),
        n("Mul", ["h", "mask3"], ["hm"]),
        n("ReduceSum", ["hm", "axis1"], ["sum"], keepdims=0),
        n("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        n("Div", ["sum", "count"], ["pooled"]),
        n("MatMul", ["pooled", "w2"], ["logits"]),
        n("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
    ]
    return _model(nodes, inputs, outputs, inits)


def tokens(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - seq // 3 :] = 0  # padding at the end, as a tokenizer writes it
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_mnn_gather_with_int64_ids_is_right_and_int64_outputs_stay_int64():
    backend = get_backend("mnn")
    engine = backend.load(backend.compile(gather_model(), CompileOptions()), LoadOptions(threads=1))
    try:
        got = engine.run({"ids": np.array([[1, 2, 3, 4]], np.int64)})
        want = ort_run(gather_model(), {"ids": np.array([[1, 2, 3, 4]], np.int64)})
        np.testing.assert_array_equal(got["y"], want["y"])  # was table[[1, 0, 2, 0]]
        assert got["z"].dtype == np.int64
        np.testing.assert_array_equal(got["z"], [[2, 3, 4, 5]])
        with pytest.raises(InputError, match="outside int32"):
            engine.run({"ids": np.array([[1, 2**31]], np.int64)})
    finally:
        engine.close()


def test_mnn_token_model_verifies_and_matches_onnxruntime_at_two_lengths(tmp_path):
    model = token_model()
    samples = [tokens(1, 12, 0), tokens(2, 7, 1)]
    pkg = luodi.compile(model, tmp_path / "tokens.luodi", targets=["mnn", "onnxruntime"], samples=samples)
    mnn = next(t for t in pkg.targets if t["backend"] == "mnn")
    assert mnn["verification"]["passed"], mnn["verification"]
    with luodi.Session(pkg, backend="mnn") as session:
        for feeds in (*samples, tokens(3, 20, 2)):
            got, want = session.run(feeds), ort_run(model, feeds)
            np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
            assert got["label"].dtype == np.int64
            np.testing.assert_array_equal(got["label"], want["label"])
