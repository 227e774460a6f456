"""luodi's onnxruntime engine runs an int8 QDQ graph as written: the layers it keeps in float stay float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from luodi.backends import get_backend
from luodi.backends.base import Artifact, LoadOptions

ort = pytest.importorskip("onnxruntime")


def kept_float_layer() -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> a depthwise Conv left in float (per-channel weights spanning 1e-4..1, as after folding a
    BatchNorm) -> Clip 0..6 -> Q/DQ: the shape of an int8 graph whose fallback kept one sensitive layer in float."""
    rng = np.random.default_rng(0)
    c = 8
    w = (rng.standard_normal((c, 1, 3, 3)) * np.logspace(-4, 0, c)[:, None, None, None]).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array((rng.standard_normal(c) * 2).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0.0235, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s2"),
        numpy_helper.from_array(np.array(128, np.uint8), "z2"),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["y", "lo", "hi"], ["yc"]),
        helper.make_node("QuantizeLinear", ["yc", "s2", "z2"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "kept_float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 8, 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_layer_an_int8_graph_keeps_in_float_is_not_quantised_by_the_engine() -> None:
    """onnxruntime's WeightBiasQuantization would quantise the float Conv's weights per tensor (its small channels
    then round to zero: 3 output steps off here, and Lite0's fallback fell from 92% to 66% agreement); the engine
    gives the graph's own outputs, as onnxruntime computes them with every optimisation off."""
    model = kept_float_layer()
    x = np.random.default_rng(1).uniform(0, 6, (1, 8, 8, 8)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = as_written.run(None, {"x": x})[0]
    backend = get_backend("onnxruntime")
    engine = backend.load(Artifact("onnxruntime", "int8", {"model.onnx": model.SerializeToString()}), LoadOptions())
    try:
        got = engine.run({"x": x})["out"]
    finally:
        engine.close()
    np.testing.assert_array_equal(got, want)
