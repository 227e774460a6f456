"""openvino:int8 quantised by OpenVINO's NNCF (compile option quantizer=nncf) instead of luodi's QDQ graph: the
Fashion-MNIST CNN trained here, compiled from its float graph and calibrated by NNCF on the compile's samples,
judged on the 10k test set against fp32 and by luodi's gate on held-apart images."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from luodi.zoo import fashion_mnist as fm

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

pytest.importorskip("torch")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def fashion(fashion_cnn):
    import torch

    from luodi.frontends.torch import to_onnx

    net, test_images, test_labels = fashion_cnn
    model = to_onnx(
        net, torch.from_numpy(fm.to_input(test_images[:2])), input_names=["images"], output_names=["logits"]
    )
    return model, test_images, test_labels


def _compile(model, images, out, **options):
    return luodi.compile(
        model,
        out,
        ["onnxruntime:fp32", "openvino:fp32", "openvino:int8"],
        calibration=fm.to_input(images[:128]),
        validation=fm.to_input(images[-1000:]),
        accuracy_budget="2%",
        target_options={"openvino": {"quantizer": "nncf", **options}},
    )


def _run(pkg, target, x):
    backend, precision = target.split(":")
    with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
        return np.concatenate([s.run({"images": x[i : i + 500]})["logits"] for i in range(0, len(x), 500)])


def test_nncf_quantises_openvino_int8_within_the_budget(fashion, tmp_path):
    model, images, labels = fashion
    pkg = _compile(model, images, tmp_path / "nncf.luodi")
    entry = pkg.find_target("openvino", "int8")
    assert entry["status"] != "failed", entry
    q = entry["quantization"]
    assert q["passed"] and q["validation"]["held_apart"] and q["agreement"] >= 0.98, q
    assert entry["options"]["quantizer"] == {"name": "nncf", "preset": "performance", "bias_correction": "full"}
    # The engine runs NNCF's FakeQuantize ops: the IR holds them, and the outputs differ from fp32's ...
    stored = luodi.Package(pkg.path)
    assert stored.read(entry["files"]["model.xml"]).decode().count('type="FakeQuantize"') >= 4
    # The option concerns int8 alone: openvino:fp32 in the same compile is the float model.
    fp32_entry = pkg.find_target("openvino", "fp32")
    assert fp32_entry["status"] != "failed" and "quantizer" not in fp32_entry["options"]
    assert 'type="FakeQuantize"' not in stored.read(fp32_entry["files"]["model.xml"]).decode()
    x = fm.to_input(images)
    fp32, int8 = _run(pkg, "onnxruntime:fp32", x), _run(pkg, "openvino:int8", x)
    assert not np.allclose(fp32, int8, atol=1e-3)
    # ... but keep the labelled accuracy on the 10k test set.
    acc32, acc8 = (float((y.argmax(1) == labels).mean()) for y in (fp32, int8))
    assert abs(acc8 - acc32) <= 0.005, (acc32, acc8)


def test_nncf_settings_reach_nncf(fashion, tmp_path):
    """An option NNCF reads changes the result: without bias correction the int8 logits move further from fp32's."""
    model, images, _ = fashion
    x = fm.to_input(images[:2000])
    errors = {}
    for bias in ("full", "off"):
        pkg = _compile(model, images, tmp_path / f"{bias}.luodi", nncf_bias_correction=bias, nncf_preset="mixed")
        assert pkg.find_target("openvino", "int8")["options"]["quantizer"]["bias_correction"] == bias
        fp32, int8 = _run(pkg, "onnxruntime:fp32", x), _run(pkg, "openvino:int8", x)
        errors[bias] = float(np.abs((int8 - fp32).mean(0)).mean())  # the mean (per-class) error bias removes
    assert errors["full"] < errors["off"], errors


def test_nncf_options_are_checked(fashion, tmp_path):
    model, images, _ = fashion
    cases = [
        ({"quantizer": "nncf", "nncf_preset": "fast"}, "nncf_preset 'fast'"),
        ({"quantizer": "aimet"}, "no quantizer 'aimet'"),
        ({"nncf_preset": "mixed"}, "need the option quantizer=nncf"),
    ]
    # checked before any work: without calibration data the compile would otherwise stop for want of it
    for options, message in cases:
        with pytest.raises(luodi.LuodiError, match=message):
            luodi.compile(model, tmp_path / "x.luodi", ["openvino:int8"], target_options={"openvino": options})
