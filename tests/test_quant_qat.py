"""Quantisation-aware fine-tuning (luodi.quant.qat): a tiny CNN fine-tuned on a slice of Fashion-MNIST with the
onnxruntime int8 policy's fake-quant, exported to a package whose int8 targets take the trained ranges."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from luodi.quant import simulate
from luodi.zoo import fashion_mnist as fm

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

torch = pytest.importorskip("torch")
from luodi.quant.qat import QATConfig, qat  # noqa: E402


@pytest.fixture(scope="module")
def data():
    try:
        images, labels = fm.load("test")
    except luodi.MissingExtraError as exc:
        pytest.skip(str(exc))
    return fm.to_input(images[:1536]), labels[:1536]


def _tiny(x, y):
    """A conv-BN-ReLU-pool + linear net, trained for a few steps: enough to be a classifier."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(0, 1024, 64):
        loss = torch.nn.functional.cross_entropy(net(xs[i : i + 64]), ys[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_qat_ranges_reach_every_int8_target(data, tmp_path):
    x, y = data
    net = _tiny(x, y)
    config = QATConfig(data=(x[:1024], y[:1024]), epochs=1, lr=1e-3)
    trained = qat(net, torch.from_numpy(x[:2]), config, input_names=["images"], output_names=["logits"])
    # the weights were folded with the BatchNorm and put on the int8 grid: per output channel, w / (max|w| / 127)
    # is an integer, so the quantiser recovers the very integers QAT trained
    assert trained.record["batchnorms_folded"] == 1
    w = trained.module[0].weight.detach().numpy().reshape(8, -1)
    q = w / (np.abs(w).max(1, keepdims=True) / 127)
    assert np.abs(q - np.round(q)).max() < 1e-3
    assert {"images", "/2/Relu_output_0", "logits"} <= set(trained.ranges)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in trained.model.graph.node)

    pkg = luodi.export(
        net,
        torch.from_numpy(x[:2]),
        tmp_path / "qat.luodi",
        targets=["onnxruntime", "onnxruntime:int8"],
        input_names=["images"],
        output_names=["logits"],
        qat=config,
        calib_samples=64,  # min-max ranges only for the tensors QAT did not see
        validation=x[1024:1280],
        accuracy_budget="5%",
    )
    entry = pkg.find_target("onnxruntime", "int8")
    record = entry["quantization"]
    assert record["calibration"]["method"] == "qat" and record["calibration"]["trained_ranges"] >= 3
    assert record["policy"].endswith("half_to_even")  # no bias correction, no GPTQ: the trained rounding is kept
    import onnx
    from onnx import numpy_helper

    qdq = onnx.load_model_from_string(pkg.read(record["model"]))
    consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    relu = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "/2/Relu_output_0")
    lo, hi = trained.ranges["/2/Relu_output_0"]
    assert float(consts[relu.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-6)  # the scale QAT trained with
    # simulated (the QDQ graph on onnxruntime's reference kernels) and deployed (the int8 engine) agree
    with luodi.Session(pkg.path, backend="onnxruntime", precision="int8") as s:
        deployed = s.run({"images": x[1024:]})["logits"].argmax(1)
    simulated = simulate(qdq, [{"images": x[1024:]}], batch=512)[0]["logits"].argmax(1)
    assert (deployed == simulated).mean() >= 0.995
    with luodi.Session(pkg.path, backend="onnxruntime", precision="fp32") as s:
        fp32 = s.run({"images": x[1024:]})["logits"].argmax(1)
    assert abs((deployed == y[1024:]).mean() - (fp32 == y[1024:]).mean()) <= 0.02


def test_qat_ranges_reach_a_target_its_toolkit_quantises(data, tmp_path):
    """rknn:int8 is quantised by rknn-toolkit2 from the float graph: between its calibration and its quantisation
    each tensor QAT trained gets the trained range in the toolkit's config (the rest luodi's MSE ranges), the range
    onnxruntime:int8's QuantizeLinear holds for the same tensor."""
    import platform

    import onnx
    import yaml
    from onnx import numpy_helper

    from luodi import toolchain as tc

    if platform.machine() != "x86_64" or not tc.status("rknn").ok:
        pytest.skip("the rknn toolchain is not installed here: luodi toolchain install rknn (make test does)")
    x, y = data
    pkg = luodi.export(
        _tiny(x, y),
        torch.from_numpy(x[:2]),
        tmp_path / "qat-rknn.luodi",
        targets=["onnxruntime", "onnxruntime:int8", "rknn:int8"],
        input_names=["images"],
        output_names=["logits"],
        qat=QATConfig(data=(x[:1024], y[:1024]), epochs=1, lr=1e-3),
        calib_samples=64,
        validation=x[1024:1280],
        accuracy_budget="5%",
    )
    entry = pkg.find_target("rknn", "int8")
    assert entry["status"] == "verified", entry.get("error")
    assert entry["options"]["trained_ranges"] >= 1
    relu = "/2/Relu_output_0"
    cfg = yaml.safe_load(pkg.read(entry["files"]["model.quantization.cfg"]))["quantize_parameters"][relu]
    qdq = onnx.load_model_from_string(pkg.read(pkg.find_target("onnxruntime", "int8")["quantization"]["model"]))
    consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu)
    scale, zero = float(consts[q.input[1]]), int(consts[q.input[2]])
    assert cfg["min"][0] == pytest.approx(-zero * scale, abs=1e-5)  # QAT's (lo, hi): zero at -lo / scale
    assert cfg["max"][0] == pytest.approx((255 - zero) * scale, rel=1e-3)


def test_qat_refuses_bad_data():
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(luodi.InputError, match="labels"):
        qat(net, torch.zeros(1, 4), QATConfig(data=(np.zeros((3, 4), np.float32), np.zeros(2, np.int64))))
    with pytest.raises(luodi.InputError, match="numpy array or a torch tensor"):
        qat(net, torch.zeros(1, 4), QATConfig(data=[[1, 2, 3, 4]] * 2))
