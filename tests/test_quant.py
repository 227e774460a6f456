"""int8: calibration methods, the compile-time gate, layer-wise diagnosis, the fallback, and the accuracy of the
Fashion-MNIST CNN deployed on every int8 engine. Real engines, real data, a CNN trained here."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from luodi.quant import PTQ, calibrate, first_output, load_feeds, policy_of, prepare, quantize, run_on, simulate
from luodi.zoo import fashion_mnist as fm

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

pytest.importorskip("torch")
INT8_TARGETS = ["onnxruntime:int8", "openvino:int8"]


@pytest.fixture(scope="session")
def fashion(fashion_cnn):
    return fashion_cnn


@pytest.fixture(scope="session")
def fashion_pkg(fashion, tmp_path_factory):
    import torch

    net, images, _ = fashion
    path = tmp_path_factory.mktemp("quant") / "fashion.luodi"
    example = torch.from_numpy(fm.to_input(images[:2]))
    pkg = luodi.export(
        net,
        example,
        path,
        targets=["onnxruntime", *INT8_TARGETS],
        input_names=["images"],
        output_names=["logits"],
        calibration="fashion-mnist:train",
        calib_samples=200,
        validation=fm.to_input(images[-1000:]),
        accuracy_budget="2%",
    )
    return pkg


def _accuracy(pkg, target, images, labels):
    backend, precision = target.split(":")
    with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
        return fm.accuracy(lambda x: s.run({"images": x})["logits"], images, labels)[0]


def test_int8_targets_keep_fashion_mnist_accuracy(fashion, fashion_pkg):
    _, images, labels = fashion
    fp32 = _accuracy(fashion_pkg, "onnxruntime:fp32", images, labels)
    qdq = luodi.Package(fashion_pkg.path)
    t = qdq.find_target("onnxruntime", "int8")
    import onnx

    simulated_model = onnx.load_model_from_string(qdq.read(t["quantization"]["model"]))
    feeds = [{"images": fm.to_input(images[i : i + 500])} for i in range(0, len(labels), 500)]
    sim_pred = np.concatenate([o["logits"].argmax(1) for o in simulate(simulated_model, feeds, batch=500)])
    simulated = float((sim_pred == labels).mean())
    for target in INT8_TARGETS:
        entry = qdq.find_target(*target.split(":"))
        assert entry["verification"]["passed"], entry["verification"]
        q = entry["quantization"]
        assert q["validation"]["held_apart"] and q["passed"] and q["agreement"] >= 0.98
        deployed = _accuracy(fashion_pkg, target, images, labels)
        assert abs(deployed - fp32) <= 0.003, (target, fp32, deployed)
        assert abs(deployed - simulated) <= 0.001, (target, simulated, deployed)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_methods(fashion, method):
    from dataclasses import replace

    net, images, labels = fashion
    model = prepare(_onnx(net, images))
    # the observers are what is tested here: nearest rounding (GPTQ has its own test below) skips the covariances
    policy = replace(policy_of(luodi.get_backend("onnxruntime")), weight_rounding="nearest")
    calib = calibrate(model, load_feeds(fm.to_input(images[:64]), _inputs(model), limit=64), method, policy)
    ranges = {k: _range(v) for k, v in calib.ranges.items()}
    assert len(ranges) >= 5 and all(lo <= hi for lo, hi in ranges.values())
    q = quantize(model, calib, policy)
    x = fm.to_input(images[1000:3000])
    ref = simulate(model, [{"images": x}], batch=2000)[0]["logits"].argmax(1)
    got = simulate(q, [{"images": x}], batch=2000)[0]["logits"].argmax(1)
    assert (ref == got).mean() >= 0.97, method
    if method != "minmax":  # the histogram observers clip outliers that min-max keeps
        mm = calibrate(model, load_feeds(fm.to_input(images[:64]), _inputs(model)), "minmax", policy)
        assert any(ranges[k][1] < _range(mm.ranges[k])[1] - 1e-6 for k in ranges if k in mm.ranges)


def test_bias_correction_removes_each_layers_mean_weight_error(fashion):
    """For every corrected Conv, on the calibration data, the conv with its dequantised int8 weights and corrected
    bias has the float conv's mean output per channel (padding borders included); without it, it does not."""
    import onnx
    import torch
    from onnx import numpy_helper

    from luodi.quant.bias import _dequantised_weights, correct_biases

    net, images, _ = fashion
    model = prepare(_onnx(net, images))
    policy = policy_of(luodi.get_backend("onnxruntime"))
    x = fm.to_input(images[:64])
    calib = calibrate(model, load_feeds(x, _inputs(model)), "minmax", policy)
    assert calib.input_means and policy.bias_correction
    qdq = quantize(model, calib, policy)
    corrected, fixed = correct_biases(model, qdq, calib.input_means)
    assert fixed >= 2
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    first = convs[0]
    assert first.input[0] == "images"  # its input is the data itself, so the check below is exact
    weights = _dequantised_weights(qdq)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == first.input[1]))
    b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == first.input[2]))
    b2 = numpy_helper.to_array(next(i for i in corrected.graph.initializer if i.name == first.input[2]))
    pads = next((list(a.ints) for a in first.attribute if a.name == "pads"), [0, 0, 0, 0])
    strides = next((list(a.ints) for a in first.attribute if a.name == "strides"), [1, 1])

    def mean_out(weight, bias):
        xt = torch.nn.functional.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2]))
        y = torch.nn.functional.conv2d(xt, torch.tensor(weight).double(), torch.tensor(bias).double(), strides)
        return y.mean((0, 2, 3)).numpy()

    want = mean_out(w, b)
    before = np.abs(mean_out(weights[first.name], b) - want).max()
    after = np.abs(mean_out(weights[first.name], b2) - want).max()
    assert before > 1e-4 and after < 1e-5 * max(1.0, np.abs(want).max()), (before, after)
    assert not np.allclose(b, b2)
    onnx.checker.check_model(corrected)


def test_gptq_rounding_lowers_the_layer_output_error(fashion):
    """GPTQ weight rounding (the default policy) keeps the quantiser's scales and integer range, and on the
    calibration data the first conv's output error (its variance part: bias correction removes the mean) is
    lower than with nearest rounding; the whole model's logits are closer to float on held-apart images."""
    from dataclasses import replace

    import torch
    from onnx import numpy_helper

    from luodi.quant.bias import _dequantised_weights
    from luodi.quant.sensitivity import first_output, snr_db

    net, images, _ = fashion
    model = prepare(_onnx(net, images))
    policy = policy_of(luodi.get_backend("onnxruntime"))
    assert policy.weight_rounding == "gptq"
    nearest = replace(policy, weight_rounding="nearest")
    x = fm.to_input(images[:128])
    calib = calibrate(model, load_feeds(x, _inputs(model)), "minmax", policy)
    assert calib.input_covariances
    q_gptq, q_near = quantize(model, calib, policy), quantize(model, calib, nearest)

    def scales(q):
        return {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_scale")}

    sg, sn = scales(q_gptq), scales(q_near)
    assert sg.keys() == sn.keys() and all(np.array_equal(sg[k], sn[k]) for k in sg)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    assert first.input[0] == "images"
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == first.input[1]))
    wg, wn = _dequantised_weights(q_gptq)[first.name], _dequantised_weights(q_near)[first.name]
    assert not np.allclose(wg, wn)
    step = np.abs(w).reshape(len(w), -1).max(1) / (64 if policy.weights.bits == 7 else 127)
    assert np.all(np.abs(wg - w).reshape(len(w), -1).max(1) <= 4 * step + 1e-6)
    pads = next((list(a.ints) for a in first.attribute if a.name == "pads"), [0, 0, 0, 0])
    strides = next((list(a.ints) for a in first.attribute if a.name == "strides"), [1, 1])

    def error_variance(dw):
        xt = torch.nn.functional.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2]))
        e = torch.nn.functional.conv2d(xt, torch.tensor(dw).double(), None, strides)
        return float((e - e.mean((0, 2, 3), keepdim=True)).pow(2).mean())

    assert error_variance(wg - w) < 0.8 * error_variance(wn - w)
    held = load_feeds(fm.to_input(images[-500:]), _inputs(model))
    ref = first_output(simulate(model, held))
    got_g, got_n = first_output(simulate(q_gptq, held)), first_output(simulate(q_near, held))
    assert snr_db(ref, got_g) > snr_db(ref, got_n), (snr_db(ref, got_g), snr_db(ref, got_n))


def test_gate_fails_an_over_tight_budget_and_writes_nothing(fashion, tmp_path):
    net, images, _ = fashion
    out = tmp_path / "tight.luodi"
    with pytest.raises(luodi.VerificationError, match="nothing was written"):
        luodi.compile(
            _onnx(net, images),
            out,
            ["onnxruntime:int8"],
            calibration=fm.to_input(images[:64]),
            validation=fm.to_input(images[2000:4000]),
            accuracy_budget="0%",
            fallback=False,
        )
    assert not out.exists()


def test_fallback_meets_a_budget_plain_int8_misses(fashion):
    net, images, _ = fashion
    backend = luodi.get_backend("onnxruntime")
    ptq = PTQ(
        _onnx(net, images),
        _inputs(_onnx(net, images)),
        fm.to_input(images[:32]),
        samples=32,
        validation=fm.to_input(images[4000:6000]),
        method="minmax",
    )
    qdq, plain = ptq.for_backend(backend, 0.5, allow_fallback=False)
    # what plain int8 misses on the half the fallback chooses on
    missed = 1 - ptq.measure(ptq.float_outputs("tune"), first_output(run_on(backend, qdq, ptq.tune_feeds)))
    assert missed > 0, "plain int8 agrees on every sample; nothing for the fallback to do"
    budget = missed / 2
    _, fixed = ptq.for_backend(backend, budget)
    # the fallback met the budget on the half it chose on; the record reports the other half, which it never saw
    assert fixed["fallback"]["met"] and fixed["float_layers"], fixed
    assert 1 - fixed["fallback"]["agreement"] <= budget
    assert fixed["fallback"]["steps"][0]["float_layers"] == 0
    assert fixed["validation"]["samples"] == fixed["validation"]["tuned_on"]["samples"] == 1000
    assert not fixed["validation"]["tuned_on"]["same_samples"]
    assert fixed["passed"] == (1 - fixed["agreement"] <= budget)
    assert fixed["agreement"] > plain["agreement"] - 0.01  # float layers chosen on one half help on the other


def test_the_fallback_chooses_on_other_samples_than_agreement_is_reported_on(fashion):
    """By default the validation samples are split: every other one for the fallback's choices, the rest for the
    reported (and gated) agreement; without held-apart data both halves come from the calibration samples, and the
    record says so."""
    net, images, _ = fashion
    model = _onnx(net, images)
    ptq = PTQ(model, _inputs(model), fm.to_input(images[:16]), samples=16, validation=fm.to_input(images[100:111]))
    assert len(ptq.tune_feeds) == 6 and len(ptq.report_feeds) == 5
    tuned = {f["images"].tobytes() for f in ptq.tune_feeds}
    assert not tuned & {f["images"].tobytes() for f in ptq.report_feeds}
    _, record = ptq.for_backend(luodi.get_backend("onnxruntime"), 0.5, allow_fallback=False)
    assert record["validation"] == {
        "data": "array (11, 1, 28, 28)",
        "samples": 5,
        "held_apart": True,
        "tuned_on": {"data": "array (11, 1, 28, 28)", "samples": 6, "same_samples": False},
    }
    alone = PTQ(model, _inputs(model), fm.to_input(images[:8]), samples=8)
    assert len(alone.tune_feeds) == len(alone.report_feeds) == 4 and not alone.held_apart


def test_layerwise_marks_where_the_error_jumps(fashion_pkg):
    from luodi.verify.layerwise import layerwise

    pkg = luodi.Package(fashion_pkg.path)
    feeds = {"images": fm.to_input(fm.load("test")[0][:4])}
    report = layerwise(pkg, {"backend": "reference", "precision": "fp32"}, pkg.find_target("openvino", "int8"), feeds)
    ops = [r.op for r in report.rows]
    assert {"Relu", "MaxPool", "Gemm"} <= set(ops) and len(report.rows) >= 6
    assert all(r.cosine > 0.99 and 20 < r.snr_db < 80 for r in report.rows)
    # fp32 against itself: no tensor drops below the jump threshold
    same = layerwise(pkg, {"backend": "reference", "precision": "fp32"}, pkg.find_target("onnxruntime", "fp32"), feeds)
    assert same.first_jump is None and all(r.snr_db > 60 for r in same.rows)


def test_engines_without_int8_say_why():
    with pytest.raises(luodi.NotApplicableError, match="no int8 target: the torch backend runs the float"):
        policy_of(luodi.get_backend("torch"))
    for name in ("ncnn", "mnn"):  # their own int8: symmetric per-tensor activations
        assert policy_of(luodi.get_backend(name)).activations.symmetric


def test_int8_without_calibration_is_a_clear_error(fashion, tmp_path):
    net, images, _ = fashion
    with pytest.raises(luodi.CompileError, match="calibration data"):
        luodi.compile(_onnx(net, images), tmp_path / "x.luodi", ["onnxruntime:int8"])


def _range(data):
    lo, hi = data.range_value
    return float(np.min(lo)), float(np.max(hi))


def _inputs(model):
    from luodi.tensor import specs_from_onnx

    return specs_from_onnx(model)[0]


_ONNX = {}


def _onnx(net, images):
    if "m" not in _ONNX:
        import torch

        from luodi.frontends.torch import to_onnx

        _ONNX["m"] = to_onnx(
            net, torch.from_numpy(fm.to_input(images[:2])), input_names=["images"], output_names=["logits"]
        )
    return _ONNX["m"]
