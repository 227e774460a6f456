"""Shared fixtures: a small real CNN built with onnx.helper, and the real EfficientNet-Lite0 package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->5), dynamic batch."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=[w, b, fw, fb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def detector_head_model(seed: int = 0) -> onnx.ModelProto:
    """A detector's head in miniature: one output ``y`` (batch x 6 x 16 x 16) that concatenates 4 channels of box
    coordinates in pixels (Relu x 300: 0..several hundred) with 2 channels of 0..1 scores (Sigmoid), as YOLOv8's
    does. One int8 scale for ``y`` rounds every score to 0 or to one step of about 2."""
    rng = np.random.default_rng(seed)
    wb = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "wb")
    ws = numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "ws")
    pixels = numpy_helper.from_array(np.array(300.0, np.float32), "pixels")
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["cb"], name="box_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cb"], ["rb"], name="box_relu"),
        helper.make_node("Mul", ["rb", "pixels"], ["boxes"], name="box_scale"),
        helper.make_node("Conv", ["x", "ws"], ["cs"], name="score_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["cs"], ["scores"], name="score_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "detector_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 16, 16])],
        initializer=[wb, ws, pixels],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fcn_model() -> onnx.ModelProto:
    """Conv(3->4, 3x3) -> Relu: fully convolutional, dynamic batch, height and width."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "fcn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Auto-selection caches timings; keep the tests' timings out of the user's ~/.cache. Vendor toolchains stay
    where `make test` installed them (luodi toolchain install): the real cache's toolchains/, unless set."""
    import os

    from luodi.toolchain import toolchains_dir

    os.environ.setdefault("LUODI_TOOLCHAINS_DIR", str(toolchains_dir()))
    os.environ["LUODI_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def installed(backend: str) -> bool:
    try:
        return luodi.get_backend(backend).available().ok
    except luodi.LuodiError:
        return False


@pytest.fixture(scope="session")
def cnn_model() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture(scope="session")
def cnn_package(tmp_path_factory: pytest.TempPathFactory, cnn_model: onnx.ModelProto) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "cnn.luodi"
    luodi.compile(cnn_model, out, targets=["onnxruntime", "reference"], name="small-cnn")
    return out


@pytest.fixture(scope="session")
def fashion_cnn():
    """The Fashion-MNIST CNN trained here for 0.2 epoch (seed 0, two torch threads), once per test run, with the
    10k test split: ``(net, test_images, test_labels)``. Training is the dearest step of the int8 tests."""
    pytest.importorskip("torch")
    from luodi.zoo import fashion_mnist as fm

    try:
        test_images, test_labels = fm.load("test")
    except luodi.MissingExtraError as exc:
        pytest.skip(str(exc))
    import torch

    torch.set_num_threads(2)
    return fm.train(epochs=0.2, seed=0), test_images, test_labels


@pytest.fixture(scope="session")
def effnet_source():
    """EfficientNet-Lite0 exported once per test run (torch export takes a few seconds)."""
    from luodi.zoo import efficientnet_lite0

    return efficientnet_lite0()


@pytest.fixture(scope="session")
def effnet_package(tmp_path_factory: pytest.TempPathFactory, effnet_source) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "efficientnet-lite0.luodi"
    luodi.compile(effnet_source, out, targets=["onnxruntime"])
    return out
