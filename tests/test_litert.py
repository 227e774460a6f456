"""The litert backend (issue 16): a small CNN exported from PyTorch, converted by litert-torch to litert:fp32 and
made full integer by ai-edge-quantizer (litert:int8, int8 inputs and outputs), verified at compile time and run
in-process by ai-edge-litert's Interpreter through Session with float and int8 I/O. The ONNX route (onnx2tf in its
own toolchain) is tested in test_litert_onnx.py."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from conftest import small_cnn
from luodi.errors import OptionError

pytest.importorskip("ai_edge_litert", reason="litert is not installed: pip install 'luodi[litert]'")
pytest.importorskip("litert_torch", reason="litert-torch is not installed: pip install 'luodi[litert]'")
torch = pytest.importorskip("torch")

try:
    import ethosu.vela  # noqa: F401

    VELA = ["ethos-u55-128"]
except ImportError:
    VELA = []


class _Net(torch.nn.Module):
    """Conv -> ReLU -> strided Conv -> ReLU -> mean -> Linear: an NCHW image model whose layout a converter moves."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def _calibration(n: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> luodi.Package:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("litert") / "cnn.luodi"
    return luodi.export(
        _Net().eval(),
        torch.zeros(1, 3, 16, 16),
        out,
        ["onnxruntime", "litert:fp32", "litert:int8"],
        input_names=["x"],
        output_names=["y"],
        calibration=_calibration(),
        accuracy_budget="50%",
        estimate=VELA or None,
    )


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)


@pytest.fixture
def fp32(pkg: luodi.Package, x: np.ndarray) -> np.ndarray:
    with luodi.Session(pkg, backend="onnxruntime") as s:
        return s.run({"x": x})["y"]


def test_both_targets_are_verified_tflite_files(pkg: luodi.Package) -> None:
    from ai_edge_litert.interpreter import Interpreter

    for precision in ("fp32", "int8"):
        t = pkg.find_target("litert", precision)
        assert t["status"] == "verified", t.get("reason")
        assert t["verification"]["passed"] and t["verification"]["samples"] >= 1
        data = pkg.read(t["files"]["model.tflite"])
        assert data[4:8] == b"TFL3"  # a TFLite flatbuffer
        interp = Interpreter(model_content=data)
        (inp,) = interp.get_input_details()
        assert list(inp["shape"]) == [1, 3, 16, 16]  # NCHW at the boundary, as the canonical graph
        assert inp["dtype"] == (np.int8 if precision == "int8" else np.float32)
    q = pkg.find_target("litert", "int8")["quantization"]  # judged on the engine against the float model
    assert q["policy"] == "litert's own toolkit" and q["calibration"]["samples"] == 24
    assert q["passed"] and q["cosine"] > 0.99


def test_int8_io_specs_are_the_tflite_quantisation_parameters(pkg: luodi.Package) -> None:
    from ai_edge_litert.interpreter import Interpreter

    t = pkg.find_target("litert", "int8")
    ins, outs = pkg.target_io(t)
    interp = Interpreter(model_content=pkg.read(t["files"]["model.tflite"]))
    for spec, detail in ((ins[0], interp.get_input_details()[0]), (outs[0], interp.get_output_details()[0])):
        assert spec.dtype == "int8" and spec.is_quantised
        assert (spec.scale, spec.zero_point) == pytest.approx(detail["quantization"])
    # calibration pixels are in [0, 1): the asymmetric int8 range maps them onto -128..127
    assert ins[0].scale == pytest.approx(1 / 255, rel=0.02) and ins[0].zero_point == -128
    assert "io" not in pkg.find_target("litert", "fp32")


def test_float_and_int8_round_trips(pkg: luodi.Package, x: np.ndarray, fp32: np.ndarray) -> None:
    with luodi.Session(pkg, backend="litert:fp32") as s:
        np.testing.assert_allclose(s.run({"x": x})["y"], fp32, rtol=1e-5, atol=1e-5)  # a batch of 2, built at 1
    with (
        luodi.Session(pkg, backend="litert:int8") as s,
        luodi.Session(pkg, backend="litert:int8", raw_int8=True) as raw,
    ):
        spec_in, spec_out = s.inputs[0], s.outputs[0]
        from_float = s.run({"x": x})["y"]
        assert from_float.dtype == np.float32 and from_float.shape == (2, 5)
        q = spec_in.quantise(x)
        assert q.dtype == np.int8
        np.testing.assert_array_equal(s.run({"x": q})["y"], from_float)
        got_raw = raw.run({"x": x})["y"]
        assert got_raw.dtype == np.int8
        np.testing.assert_array_equal(spec_out.dequantise(got_raw), from_float)
    assert np.abs(from_float - fp32).max() < 0.05 * np.abs(fp32).max() + 4 * spec_out.scale
    assert not np.array_equal(from_float, fp32)  # it did run in int8


def test_int8_input_reaches_the_interpreter_without_a_copy(pkg: luodi.Package, x: np.ndarray) -> None:
    with luodi.Session(pkg, backend="litert:int8") as s:
        q = s.inputs[0].quantise(x[:1])
        seen = []
        interp = s._engine._interp
        set_tensor = interp.set_tensor

        def recording(index: int, value: np.ndarray) -> None:
            seen.append(value)
            set_tensor(index, value)

        interp.set_tensor = recording
        s.run({"x": q})
        s.run({"x": x[:1]})
    assert seen[0] is q and np.shares_memory(seen[0], q)
    assert seen[1].dtype == np.int8 and not np.shares_memory(seen[1], x)  # float quantised at the boundary


def test_threads_option_and_shapes_other_than_built(pkg: luodi.Package, x: np.ndarray, fp32: np.ndarray) -> None:
    with luodi.Session(pkg, backend="litert:fp32", options={"num_threads": 2}) as s:
        np.testing.assert_allclose(s.run({"x": x})["y"], fp32, rtol=1e-5, atol=1e-5)
        with pytest.raises(luodi.InputError):
            s.run({"x": np.zeros((1, 3, 20, 20), np.float32)})
    with pytest.raises(OptionError, match="num_threads"):
        luodi.Session(pkg, backend="litert:fp32", options={"num_threads": "2"})


def test_vela_estimate_in_the_manifest_and_in_luodi_info(pkg: luodi.Package) -> None:
    import json

    from click.testing import CliRunner

    from luodi.cli.main import cli

    if not VELA:
        pytest.skip("ethos-u-vela is not installed: pip install 'luodi[vela]'")
    e = pkg.find_target("litert", "int8")["estimate"]["ethos-u55-128"]
    assert e["inference_ms"] > 0 and e["cycles"] > 0 and e["sram_kib"] > 0 and e["flash_kib"] > 0
    # the Conv layers run on the NPU; Vela leaves a MEAN over a 7x7 map with 8 channels to the CPU, and says why
    assert e["npu_ops"] >= 1 and e["cpu_ops"] >= 1 and e["cpu_fallback"] == ["MEAN"] and e["reasons"]["MEAN"]
    assert "estimate" not in pkg.find_target("litert", "fp32")  # Vela takes full-int8 models only
    text = CliRunner().invoke(cli, ["info", str(pkg.path)])
    assert text.exit_code == 0, text.output
    assert "ethos-u55-128" in text.output and "MEAN" in text.output
    described = CliRunner().invoke(cli, ["info", str(pkg.path), "--json"])
    rows = {t["target"]: t for t in json.loads(described.output)["targets"]}
    assert rows["litert:int8"]["estimate"]["ethos-u55-128"]["inference_ms"] == e["inference_ms"]


def test_estimate_is_refused_before_any_work_for_an_unknown_config_or_no_int8_litert(tmp_path) -> None:
    if not VELA:
        pytest.skip("ethos-u-vela is not installed: pip install 'luodi[vela]'")
    with pytest.raises(luodi.CompileError, match="ethos-u55-128"):
        luodi.compile(small_cnn(), tmp_path / "a.luodi", ["litert:int8"], estimate=["ethos-u99"])
    with pytest.raises(luodi.CompileError, match="litert:int8"):
        luodi.compile(small_cnn(), tmp_path / "b.luodi", ["onnxruntime"], estimate=["ethos-u55-128"])


def test_normalisation_folded_into_the_graph_is_applied_to_the_converted_program(tmp_path) -> None:
    """The pipeline's normalize step folds into the ONNX graph's first Conv, not into the torch.export program that
    litert converts: the .tflite must then normalise its pixel input itself to match the graph."""
    torch.manual_seed(1)
    mean, std = [127.0, 127.0, 127.0], [58.0, 57.0, 57.5]
    pipeline = {
        "task": "classification",
        "input": "x",
        "pre": [
            {"op": "decode_image", "mode": "RGB"},
            {"op": "normalize", "mean": mean, "std": std},
            {"op": "to_tensor", "layout": "CHW", "dtype": "float32"},
        ],
        "post": [],
    }
    pkg = luodi.export(
        _Net().eval(),
        torch.zeros(1, 3, 16, 16),
        tmp_path / "norm.luodi",
        ["onnxruntime", "litert:fp32"],
        input_names=["x"],
        output_names=["y"],
        pipeline=pipeline,
    )
    assert pkg.pipeline["folded_into_model"]["mean"] == mean
    assert pkg.find_target("litert", "fp32")["status"] == "verified"
    pixels = np.random.default_rng(2).integers(0, 256, (1, 3, 16, 16)).astype(np.float32)
    with luodi.Session(pkg, backend="onnxruntime") as ref, luodi.Session(pkg, backend="litert:fp32") as s:
        np.testing.assert_allclose(s.run({"x": pixels})["y"], ref.run({"x": pixels})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_int8_outside_the_budget_fails_with_the_budget_not_a_float_layer_search(tmp_path) -> None:
    """litert cannot keep layers in float: a litert:int8 target outside the accuracy budget fails saying so, where
    rknn's toolkit would be asked for float layers."""
    torch.manual_seed(2)
    net = _Net().eval()
    with torch.no_grad():
        # five logits a hair apart around a common value that varies: int8 outputs tie and top-1 moves
        net.fc.weight.copy_(net.fc.weight[:1] + 1e-3 * net.fc.weight)
        net.fc.bias.zero_()
    pkg = luodi.export(
        net,
        torch.zeros(1, 3, 16, 16),
        tmp_path / "tight.luodi",
        ["onnxruntime", "litert:int8"],
        input_names=["x"],
        output_names=["y"],
        calibration=_calibration(),
        accuracy_budget="0%",
    )
    t = pkg.find_target("litert", "int8")
    assert t["status"] == "failed"
    assert "below the" in t["reason"] and "litert:fp32" in t["reason"] and "float_tensors" not in t["reason"]


class _Offset(torch.nn.Module):
    """Conv -> ReLU -> depthwise Conv -> mean -> Linear, where the depthwise kernels round with one sign: each
    channel's kernel is one tap of 1 (which sets its int8 scale, 1/127) and eight taps of 0.49/127, which round to
    0, over a near-constant input (the first Conv's bias of 10): a constant offset of -3.1% of that input, the
    failure bias correction is for (EfficientNet-Lite0's depthwise layers after BatchNorm folding)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.c1.bias.fill_(10.0)
            self.dw.weight.fill_(0.49 / 127)
            self.dw.weight[:, :, 1, 1] = 1.0
            self.dw.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(torch.relu(self.c1(x))).mean((2, 3)))


def _plain_int8(data: bytes, calibration: list[dict[str, np.ndarray]]) -> bytes:
    """The .tflite quantised by ai-edge-quantizer's static_wi8_ai8 on the global min and max of the calibration
    samples and nothing else: what litert:int8 was before luodi chose the ranges and corrected the biases."""
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    qt = quantizer.Quantizer(data)
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    cal = calibrator.Calibrator(data, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({"serving_default": [{"args_0": f["x"]} for f in calibration]}, qt._recipe_manager)
    return bytes(qt.quantize(cal.get_model_qsvs()).quantized_model)


def _run_int8(data: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    (i,), (o,) = interp.get_input_details(), interp.get_output_details()
    (si, zi), (so, zo) = i["quantization"], o["quantization"]
    out = []
    for row in x:
        interp.set_tensor(i["index"], np.clip(np.round(row[None] / si) + zi, -128, 127).astype(np.int8))
        interp.invoke()
        out.append((interp.get_tensor(o["index"]).astype(np.float32) - zo) * so)
    return np.concatenate(out)


def _scales(data: bytes) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=data).get_tensor_details()
    return {d["name"]: float(d["quantization"][0]) for d in details if d["quantization"][0]}


def test_int8_corrects_the_biases_of_rounded_weights_and_chooses_activation_ranges(tmp_path) -> None:
    """litert:int8 is ai-edge-quantizer's recipe plus luodi's bias correction and MSE activation ranges: against the
    recipe alone (min/max ranges, no correction) on the same float .tflite, its outputs lose the depthwise layer's
    constant offset, and intermediate activations get narrower ranges than their min and max."""
    torch.manual_seed(3)
    calibration = _calibration()
    pkg = luodi.export(
        _Offset().eval(),
        torch.zeros(1, 3, 16, 16),
        tmp_path / "offset.luodi",
        ["onnxruntime", "litert:fp32", "litert:int8"],
        input_names=["x"],
        output_names=["y"],
        calibration=calibration,
        accuracy_budget="50%",
    )
    t = pkg.find_target("litert", "int8")
    assert t["status"] == "verified", t.get("reason")
    assert t["options"]["int8"]["bias_corrected_layers"] == 3  # both Conv layers and the Linear
    ours = pkg.read(t["files"]["model.tflite"])
    plain = _plain_int8(pkg.read(pkg.find_target("litert", "fp32")["files"]["model.tflite"]), calibration)
    x = np.random.default_rng(4).random((32, 3, 16, 16), dtype=np.float32)
    with luodi.Session(pkg, backend="onnxruntime") as s:
        ref = s.run({"x": x})["y"]
    err_ours, err_plain = _run_int8(ours, x) - ref, _run_int8(plain, x) - ref
    assert np.abs(err_plain.mean(0)).max() > 0.05 * np.abs(ref).max()  # the offset, uncorrected
    assert np.abs(err_ours.mean(0)).max() < 0.2 * np.abs(err_plain.mean(0)).max()
    assert (err_ours**2).mean() < 0.1 * (err_plain**2).mean()
    ranged, min_max = _scales(ours), _scales(plain)
    narrower = [n for n in ranged if n in min_max and ranged[n] < 0.99 * min_max[n]]
    assert narrower, "no activation got a range narrower than its min and max"
    boundary = {d["name"] for d in _boundary_details(ours)}
    assert not boundary & set(narrower)  # the model's input and output keep their min and max


def _boundary_details(data: bytes) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    return [*interp.get_input_details(), *interp.get_output_details()]
