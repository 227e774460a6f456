"""The torch backend: runs the torch.export program of models that came from PyTorch; says when not applicable."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from conftest import installed
from luodi import selection
from luodi.zoo.images import foolbox_imagenet

pytestmark = pytest.mark.skipif(not installed("torch"), reason="torch not installed: pip install 'luodi[torch]'")


@pytest.fixture(scope="module")
def torch_package(tmp_path_factory, effnet_source):
    out = tmp_path_factory.mktemp("torch") / "effnet.luodi"
    return luodi.compile(effnet_source, out, targets=["torch", "torch:bf16", "onnxruntime"])


@pytest.mark.slow
def test_fp32_matches_the_reference(torch_package):
    target = torch_package.find_target("torch", "fp32")
    ver = target["verification"]
    assert ver["passed"] and ver["outputs"]["logits"]["max_abs"] <= 2e-4
    # the normalisation folded into the graph's first Conv reached the torch backend through CompileOptions
    assert target["options"]["input_normalization"]["input"] == "images"
    with luodi.Session(torch_package.path, backend="torch") as s:
        assert s.backend == "torch"
        for batch in (1, 3):
            assert s.run({"images": np.zeros((batch, 3, 224, 224), np.float32)})["logits"].shape == (batch, 1000)


def test_same_top1_as_onnxruntime_on_foolbox(torch_package):
    with (
        luodi.Session(torch_package.path, backend="torch") as t,
        luodi.Session(torch_package.path, backend="onnxruntime") as o,
    ):
        images = [str(p) for p, _ in foolbox_imagenet()]
        top_t = [r[0].index for r in t.predict(images, k=1)]
        top_o = [r[0].index for r in o.predict(images, k=1)]
    assert top_t == top_o


def test_bf16_is_explicit_and_outside_the_fp32_budget(torch_package):
    bf16 = torch_package.find_target("torch", "bf16")
    out = bf16["verification"]["outputs"]["logits"]
    assert bf16["verification"]["passed"] and out["max_abs"] > 1e-3  # it really runs in bf16
    assert not selection.within_budget(bf16, "fp32")


def test_onnx_models_are_not_applicable(tmp_path, cnn_model):
    with pytest.raises(luodi.NotApplicableError, match="came from ONNX"):
        luodi.compile(cnn_model, tmp_path / "x.luodi", targets=["torch"])
    assert not (tmp_path / "x.luodi").exists()
