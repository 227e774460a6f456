"""Outputs computed as their parts on integer-only targets (luodi.backends._outputs): which Concat outputs are
split, the split graph computes the parts (run by onnxruntime), and joining them gives the model's output."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from conftest import detector_head_model, small_cnn
from luodi.backends._outputs import concat_outputs, device_outputs, join_outputs, split_outputs


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))


def test_a_concat_output_is_split_into_its_parts_and_joined_back_exactly() -> None:
    model = detector_head_model()
    joins = concat_outputs(model)
    assert joins == {"y": {"parts": ["boxes", "scores"], "axis": 1}}
    assert device_outputs(["y"], joins) == ["boxes", "scores"]
    split = split_outputs(model, joins)
    onnx.checker.check_model(split)
    assert [o.name for o in split.graph.output] == ["boxes", "scores"]
    assert [o.name for o in model.graph.output] == ["y"]  # the caller's model is not changed
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    parts = _run(split, x)
    assert parts["boxes"].shape == (2, 4, 16, 16) and parts["scores"].shape == (2, 2, 16, 16)
    joined = join_outputs(parts, joins)
    assert list(joined) == ["y"]
    np.testing.assert_array_equal(joined["y"], _run(model, x)["y"])


def test_outputs_not_made_by_a_concat_of_computed_tensors_are_left_alone() -> None:
    assert concat_outputs(small_cnn()) == {}
    # a Concat taking the graph's input: cutting there would hand the device's input back as an output
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Concat", ["x", "r"], ["y"], axis=1),
            helper.make_node("Concat", ["r", "r"], ["z"], axis=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4]),
        ],
    )
    assert concat_outputs(helper.make_model(graph)) == {}
    assert split_outputs(small_cnn(), {}) is not None
    outs = {"a": np.ones(2)}
    assert join_outputs(outs, {}) is outs
