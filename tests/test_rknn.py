"""The rknn backend (issue 16): a small CNN compiled to rknn:int8 and rknn:fp16 by the real rknn-toolkit2 in its own
toolchain environment, verified on its x86 simulator, run through Session with float and int8 I/O; a missing
toolchain names its install command; a toolkit that dies is a BackendError and the caller lives on."""

from __future__ import annotations

import os
import platform
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from conftest import detector_head_model, fcn_model, small_cnn
from luodi import toolchain as tc
from luodi.backends import rknn as rknn_backend

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need Linux memfd")


def _need_toolchain() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("rknn-toolkit2 (the compiler and simulator) is x86-64 only")
    if not tc.status("rknn").ok:
        pytest.skip("the rknn toolchain is not installed here: luodi toolchain install rknn (make test does)")


def _calibration(n: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> luodi.Package:
    _need_toolchain()
    out = tmp_path_factory.mktemp("rknn") / "cnn.luodi"
    return luodi.compile(
        small_cnn(),
        out,
        ["onnxruntime", "rknn:int8", "rknn:fp16"],
        calibration=_calibration(),
        accuracy_budget="50%",
        int8_io=True,
    )


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)


@pytest.fixture
def fp32(pkg: luodi.Package, x: np.ndarray) -> np.ndarray:
    with luodi.Session(pkg, backend="onnxruntime") as s:
        return s.run({"x": x})["y"]


def test_both_targets_verified_on_the_simulator_with_the_board_file_stored(pkg: luodi.Package) -> None:
    for precision in ("int8", "fp16"):
        t = pkg.find_target("rknn", precision)
        assert t["status"] == "verified", t.get("reason")
        assert t["verification"]["passed"] and t["verification"]["samples"] >= 1
        rknn_file = pkg.read(t["files"]["model.rknn"])
        assert len(rknn_file) > 1000 and rknn_file[:4] == b"RKNN"  # the file that goes to the board
        assert t["options"]["platform"] == "rk3588"
    int8 = pkg.find_target("rknn", "int8")
    assert set(int8["files"]) == {"model.rknn", "model.model", "model.data", "model.quantization.cfg"}
    q = int8["quantization"]  # judged like luodi's own int8 targets: on the engine, against the float model
    assert q["policy"] == "rknn's own toolkit" and q["calibration"]["samples"] == 24
    assert q["passed"] and q["cosine"] > 0.99 and q["agreement"] >= 0.9
    fp16 = pkg.find_target("rknn", "fp16")  # the simulator rebuilds fp16 from the graph: stored once, the package's
    assert fp16["files"]["model.onnx"] == "model.onnx"


def test_int8_io_carries_the_toolkits_scale_and_zero_point(pkg: luodi.Package) -> None:
    ins, outs = pkg.target_io(pkg.find_target("rknn", "int8"))
    for spec in (ins[0], outs[0]):
        assert spec.dtype == "int8" and spec.is_quantised and spec.scale > 0 and -128 <= spec.zero_point <= 127
    # calibration pixels are in [0, 1): the toolkit's asymmetric int8 range maps them onto -128..127
    assert ins[0].scale == pytest.approx(1 / 255, rel=0.01) and ins[0].zero_point == -128
    assert "io" not in pkg.find_target("rknn", "fp16")


def test_session_on_the_simulator_float_and_int8_round_trips(pkg: luodi.Package, x: np.ndarray, fp32) -> None:
    with (
        luodi.Session(pkg, backend="rknn:int8", device="simulator") as s,
        luodi.Session(pkg, backend="rknn:int8", device="simulator", raw_int8=True) as raw,
    ):
        spec_in, spec_out = s.inputs[0], s.outputs[0]
        from_float = s.run({"x": x})["y"]  # a batch of 2 on a model built at batch 1: one sample at a time
        assert from_float.dtype == np.float32 and from_float.shape == (2, 5)
        q = spec_in.quantise(x)
        assert q.dtype == np.int8
        np.testing.assert_array_equal(s.run({"x": q})["y"], from_float)  # int8 in passes through to the same
        got_raw = raw.run({"x": x})["y"]
        assert got_raw.dtype == np.int8
        np.testing.assert_array_equal(spec_out.dequantise(got_raw), from_float)
    assert np.abs(from_float - fp32).max() < 0.1 * np.abs(fp32).max() + 4 * spec_out.scale
    with luodi.Session(pkg, backend="rknn:fp16", device="simulator") as s:
        half = s.run({"x": x})["y"]
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, fp32, rtol=0.01, atol=0.01 * np.abs(fp32).max())


@pytest.mark.slow
def test_a_new_process_rebuilds_the_same_int8_model_from_the_stored_files(
    pkg: luodi.Package, x: np.ndarray, tmp_path: Path
) -> None:
    """The simulator runs only what its own session built: a fresh session rebuilds from the package's files (the
    quantisation config fixes every scale), and computes what the building session computed."""
    with luodi.Session(pkg, backend="rknn:int8", device="simulator") as s:
        before = s.run({"x": x})["y"]
    rknn_backend._SESSIONS.clear()  # no idle building session left: what a new process sees
    with luodi.Session(pkg, backend="rknn:int8", device="simulator") as s:
        np.testing.assert_array_equal(s.run({"x": x})["y"], before)


def test_device_cpu_is_the_simulator_here_and_npu_is_refused_with_the_reason(pkg: luodi.Package) -> None:
    with luodi.Session(pkg, backend="rknn:fp16") as s:  # luodi's default device: the simulator off a board
        assert s.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 5)
    with pytest.raises(luodi.BackendError, match="rknn-toolkit-lite2 on an aarch64 board"):
        luodi.Session(pkg, backend="rknn:int8", device="npu")


def test_another_shape_than_the_built_one_is_a_shape_error(pkg: luodi.Package) -> None:
    with luodi.Session(pkg, backend="rknn:fp16", device="simulator") as s, pytest.raises(luodi.InputError):
        s.run({"x": np.zeros((1, 3, 20, 20), np.float32)})


def test_a_toolkit_killed_mid_call_is_a_backend_error_and_the_caller_lives(pkg: luodi.Package) -> None:
    s = luodi.Session(pkg, backend="rknn:fp16", device="simulator")
    try:
        worker = s._engine.worker
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(luodi.BackendError, match="SIGKILL|stopped"):
            s.run({"x": np.zeros((1, 3, 16, 16), np.float32)})
    finally:
        s.close()
    with luodi.Session(pkg, backend="rknn:fp16", device="simulator") as again:  # a new session rebuilds
        assert again.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 5)


def test_unknown_platform_and_missing_calibration_are_refused(tmp_path: Path) -> None:
    _need_toolchain()
    with pytest.raises(luodi.CompileError, match="no platform 'rk9999'.*rk3588"):
        luodi.compile(
            small_cnn(),
            tmp_path / "a.luodi",
            ["rknn:fp16"],
            target_options={"rknn": {"platform": "rk9999"}},
            strict=True,
        )
    with pytest.raises(luodi.CompileError, match="calibration"):
        luodi.compile(small_cnn(), tmp_path / "b.luodi", ["rknn:int8"])


def test_the_toolkits_platform_list_is_ours() -> None:
    """PLATFORMS mirrors the installed toolkit's documented list (checked here, not at every compile)."""
    _need_toolchain()
    with rknn_backend._start_worker("rknn platforms", {"device": "simulator"}) as w:
        listed = w.call("platforms")[0]["platforms"]
    assert set(rknn_backend.PLATFORMS) == set(listed)


def test_a_missing_toolchain_gives_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUODI_TOOLCHAINS_DIR", str(tmp_path))
    backend = luodi.get_backend("rknn")
    avail = backend.available()
    assert not avail.ok and avail.install.startswith("luodi toolchain install rknn")
    with pytest.raises(luodi.BackendUnavailableError, match="luodi toolchain install rknn"):
        luodi.compile(small_cnn(), tmp_path / "c.luodi", ["rknn:fp16"])


def test_without_int8_io_the_int8_target_reads_and_writes_float(tmp_path: Path, x: np.ndarray) -> None:
    _need_toolchain()
    pkg = luodi.compile(small_cnn(), tmp_path / "f.luodi", ["onnxruntime", "rknn:int8"], calibration=_calibration())
    t = pkg.find_target("rknn", "int8")
    assert t["status"] == "verified", t.get("reason")
    assert "io" not in t and t["quantization"]["cosine"] > 0.99
    with luodi.Session(pkg, backend="onnxruntime") as ref, luodi.Session(pkg, backend="rknn:int8") as s:
        assert s.inputs[0].dtype == "float32" and not s.outputs[0].is_quantised
        want, got = ref.run({"x": x})["y"], s.run({"x": x})["y"]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_on_a_board_the_npu_runs_the_package_like_the_simulator() -> None:
    """On an RK3588 board with rknn-toolkit-lite2: a package compiled on x86 (with --int8-io) given as
    $LUODI_RKNN_PACKAGE runs on the NPU through Session(device="npu"), its outputs near the fp16 control's."""
    from importlib.util import find_spec

    if platform.machine() not in ("aarch64", "arm64") or find_spec("rknnlite") is None:
        pytest.skip(
            f"needs an aarch64 Rockchip board with rknn-toolkit-lite2 and its NPU driver; this host is "
            f"{platform.machine()} (the .rknn is compiled and simulated here, run on the board)"
        )
    path = os.environ.get("LUODI_RKNN_PACKAGE")
    if not path:
        pytest.skip("set LUODI_RKNN_PACKAGE to a package compiled on x86 with rknn:int8 and rknn:fp16")
    pkg = luodi.Package(path)
    x = np.random.default_rng(1).random(tuple(d if isinstance(d, int) else 1 for d in pkg.inputs[0].shape))
    feeds = {pkg.inputs[0].name: x.astype(np.float32)}
    with (
        luodi.Session(pkg, backend="rknn:int8", device="npu") as s,
        luodi.Session(pkg, backend="rknn:fp16", device="npu") as half,
    ):
        got, want = s.run(feeds), half.run(feeds)
    for name, w in want.items():
        assert np.abs(got[name] - w).max() < 0.1 * np.abs(w).max() + 1e-3


@pytest.mark.slow
def test_accuracy_budget_keeps_luodis_most_sensitive_layers_in_float_through_hybrid_quantisation(
    tmp_path: Path,
) -> None:
    """Calibrated on dark pictures (pixels below 0.05), judged on bright ones: int8 clips everything and misses a
    0% budget; the fallback asks the toolkit to keep the layer luodi's sensitivity ranking puts first in float16
    (its hybrid quantisation), which restores agreement. Without the fallback the target fails with the reason."""
    _need_toolchain()
    rng = np.random.default_rng(0)
    dark = [{"x": 0.05 * rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(16)]
    bright = [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(32)]
    common = {"calibration": dark, "validation": bright, "accuracy_budget": "0%", "verify": False}
    pkg = luodi.compile(small_cnn(), tmp_path / "h.luodi", ["rknn:int8"], **common)
    t = pkg.find_target("rknn", "int8")
    q = t["quantization"]
    assert q["passed"] and q["agreement"] == 1.0
    assert q["fallback"]["ranking"][0] == q["float_layers"][0] == "conv" and q["fallback"]["steps"]
    assert t["options"]["float_layers"] == ["c"]  # the toolkit's name of conv's output
    assert b"'c': float16" in pkg.read(t["files"]["model.quantization.cfg"])
    strict = luodi.compile(small_cnn(), tmp_path / "s.luodi", ["onnxruntime", "rknn:int8"], fallback=False, **common)
    failed = strict.find_target("rknn", "int8")
    assert (
        failed["status"] == "failed" and "budget 0.00%" in failed["reason"] and "allow the fallback" in failed["reason"]
    )


def test_layerwise_is_the_toolkits_accuracy_analysis(pkg: luodi.Package) -> None:
    """`luodi verify --layerwise` on an rknn target: the toolkit's per-layer cosine (its quantised simulation against
    its own float run), since luodi cannot mark tensors inside a .rknn; in range, every layer stays close."""
    from luodi.verify.layerwise import layerwise

    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)  # inside the calibrated range [0, 1)
    target = pkg.find_target("rknn", "int8")
    report = layerwise(pkg, {"backend": "reference", "precision": "fp32"}, target, {"x": x})
    ops = {r.tensor: r.op for r in report.rows}
    assert ops["r"] == "Relu" and ops["x"] == "Input" and report.b == "rknn:int8"
    assert all(r.cosine > 0.99 for r in report.rows) and report.first_jump is None
    far = layerwise(pkg, {"backend": "reference", "precision": "fp32"}, target, {"x": 40 * x - 20})
    assert far.first_jump is not None and far.rows[far.first_jump].tensor == "x_int8"  # clipped at the int8 input


def test_cli_compile_takes_the_platform_as_an_option(tmp_path: Path) -> None:
    _need_toolchain()
    import onnx
    from click.testing import CliRunner

    from luodi.cli.main import cli

    onnx.save(small_cnn(), str(tmp_path / "cnn.onnx"))
    out = tmp_path / "cnn.luodi"
    args = ["compile", str(tmp_path / "cnn.onnx"), "-o", str(out), "-t", "rknn:fp16", "-q"]
    result = CliRunner().invoke(cli, [*args, "--option", "rknn.platform=rk3566"])
    assert result.exit_code == 0, result.output
    assert luodi.Package(out).find_target("rknn", "fp16")["options"]["platform"] == "rk3566"
    bad = CliRunner().invoke(cli, [*args, "--option", "rknn.cores=3"])
    assert bad.exit_code == 2 and "no compile option 'cores'" in bad.output
    typo = CliRunner().invoke(cli, [*args, "--option", "platform=rk3566"])
    assert typo.exit_code == 2 and "BACKEND.KEY=VALUE" in typo.output


def test_a_model_with_free_height_and_width_is_built_and_verified_at_its_primary_shapes(tmp_path: Path) -> None:
    """A .rknn has static shapes: the compile verifies at the shapes it was built at (the representative set that
    moves height and width is for the engines that take it), and another size is a ShapeError naming the fix."""
    _need_toolchain()
    pkg = luodi.compile(fcn_model(), tmp_path / "fcn.luodi", ["rknn:fp16"], input_shapes={"x": "1x3x24x32"})
    t = pkg.find_target("rknn", "fp16")
    assert t["status"] == "verified", t.get("reason")
    assert t["options"]["shapes"] == {"x": [1, 3, 24, 32]}
    assert t["verification"]["shapes"] == [{"x": [1, 3, 24, 32]}]  # not the set at 48x64 the others get
    with luodi.Session(pkg, backend="rknn:fp16") as s:
        assert s.run({"x": np.ones((1, 3, 24, 32), np.float32)})["y"].shape == (1, 4, 24, 32)
        with pytest.raises(luodi.ShapeError, match="--input-shape"):
            s.run({"x": np.ones((1, 3, 32, 32), np.float32)})


def test_an_output_kept_in_float_leaves_the_npu_as_float(tmp_path: Path, x: np.ndarray, fp32) -> None:
    """float_tensors naming a graph output also keeps its int8 boundary in float16 (a detector's one output mixing
    box coordinates and 0..1 scores loses the scores to one int8 scale otherwise): with --int8-io the input stays
    int8, the output is float."""
    _need_toolchain()
    pkg = luodi.compile(
        small_cnn(),
        tmp_path / "o.luodi",
        ["rknn:int8"],
        calibration=_calibration(),
        int8_io=True,
        target_options={"rknn": {"float_tensors": ["y"]}},
    )
    t = pkg.find_target("rknn", "int8")
    assert t["status"] == "verified", t.get("reason")
    assert "y_int8" in t["options"]["float_layers"] and b"'y_int8': float16" in pkg.read(
        t["files"]["model.quantization.cfg"]
    )
    ins, outs = pkg.target_io(t)
    assert ins[0].dtype == "int8" and outs[0].dtype == "float32" and not outs[0].is_quantised
    with luodi.Session(pkg, backend="rknn:int8") as s:
        y = s.run({"x": x})["y"]
    assert y.dtype == np.float32 and np.abs(y - fp32).max() < 0.1 * np.abs(fp32).max()


def test_a_head_joining_pixels_and_scores_leaves_the_device_as_its_parts(tmp_path: Path) -> None:
    """YOLOv8's one output concatenates pixel coordinates with 0..1 scores: with one int8 scale every score is lost
    (the detector finds nothing). The device computes the Concat's parts, each with its own scale, and the target
    joins them in float, so the scores keep int8's resolution of their own range."""
    _need_toolchain()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(16)]
    pkg = luodi.compile(
        detector_head_model(),
        tmp_path / "head.luodi",
        ["onnxruntime", "rknn:int8"],
        calibration=calibration,
        int8_io=True,
    )
    t = pkg.find_target("rknn", "int8")
    assert t["status"] == "verified", t.get("reason")
    assert t["options"]["joins"] == {"y": {"parts": ["boxes", "scores"], "axis": 1}}
    assert set(t["options"]["device_io"]) == {"x", "boxes", "scores"}  # each part its own int8 scale
    ins, outs = pkg.target_io(t)
    assert ins[0].dtype == "int8" and outs[0].dtype == "float32"  # joined on the host: parts of unlike scales
    x = rng.random((2, 3, 16, 16), dtype=np.float32)
    with luodi.Session(pkg, backend="onnxruntime") as ref, luodi.Session(pkg, backend="rknn:int8") as s:
        want, got = ref.run({"x": x})["y"], s.run({"x": x})["y"]
    assert got.shape == want.shape == (2, 6, 16, 16)
    assert np.abs(got[:, 4:] - want[:, 4:]).max() < 0.03  # scores: 1/255 steps (one shared scale: ~1 off)
    assert np.abs(got[:, :4] - want[:, :4]).max() < 0.05 * want[:, :4].max()


def _conv_model(w: np.ndarray, b: np.ndarray, relu_then: np.ndarray | None = None, hw: int = 4) -> onnx.ModelProto:
    """x (N x C x hw x hw) -> Conv 1x1 (w, b) -> y; with ``relu_then``, Conv -> Relu (``r``) -> Conv 1x1 -> Clip to
    [-2, 2] -> y (an output whose range no outlier stretches)."""
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu_then is not None else "y"])]
    out = w.shape[0]
    if relu_then is not None:
        inits += [
            numpy_helper.from_array(relu_then, "w2"),
            numpy_helper.from_array(np.zeros(len(relu_then), "f4"), "b2"),
        ]
        inits += [numpy_helper.from_array(np.float32(-2), "lo"), numpy_helper.from_array(np.float32(2), "hi")]
        nodes += [
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2", "b2"], ["z"]),
            helper.make_node("Clip", ["z", "lo", "hi"], ["y"]),
        ]
        out = relu_then.shape[0]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[1], hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out, hw, hw])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _int8_error(model: onnx.ModelProto, out: Path, calibration: list, x: np.ndarray, **options) -> tuple:
    pkg = luodi.compile(
        model,
        out,
        ["onnxruntime", "rknn:int8"],
        calibration=calibration,
        accuracy_budget="50%",
        target_options={"rknn": options},
    )
    with (
        luodi.Session(pkg, backend="onnxruntime") as s,
        luodi.Session(pkg, backend="rknn:int8", device="simulator", allow_failed=True) as q,  # loose: may fail its gate
    ):
        error = q.run({"x": x})["y"] - s.run({"x": x})["y"]
    return pkg, pkg.find_target("rknn", "int8"), error


def _cfg_range(pkg: luodi.Package, target: dict, tensor: str) -> tuple[float, float]:
    import yaml

    p = yaml.safe_load(pkg.read(target["files"]["model.quantization.cfg"]))["quantize_parameters"][tensor]
    return p["min"][0], p["max"][0]


def test_luodis_mse_ranges_replace_a_loose_min_max_between_the_toolkits_two_steps(tmp_path: Path) -> None:
    """One calibration pixel of 40 among 24 pictures of 256 x 256 pixels in [0, 1) stretches the min/max range of the
    Relu's output ``r`` to about 60; the MSE range (luodi's, written in the config before step 2) clips that one
    value for finer steps on the millions of others, and inputs without it lose less (the output, clipped to
    [-2, 2], has the same fine steps either way; the model's input keeps the toolkit's range, stretched for both)."""
    _need_toolchain()
    rng = np.random.default_rng(0)
    model = _conv_model(
        rng.standard_normal((8, 3, 1, 1)).astype(np.float32),
        np.zeros(8, np.float32),
        rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
        hw=256,
    )
    calibration = [{"x": rng.random((1, 3, 256, 256), dtype=np.float32)} for _ in range(24)]
    calibration[0]["x"][0, :, 0, 0] = 40.0
    x = rng.random((2, 3, 256, 256), dtype=np.float32)
    off = dict(bias_correction=False)
    pkg_t, toolkit, err_t = _int8_error(model, tmp_path / "t.luodi", calibration, x, ranges="toolkit", **off)
    pkg_l, luodi_, err_l = _int8_error(model, tmp_path / "l.luodi", calibration, x, **off)  # luodi's: the default
    assert toolkit["options"]["ranges"] == "toolkit" and toolkit["options"]["luodi_ranges"] == 0
    assert luodi_["options"]["ranges"] == "luodi" and luodi_["options"]["luodi_ranges"] >= 1
    lo_t, hi_t = _cfg_range(pkg_t, toolkit, "r")
    lo_l, hi_l = _cfg_range(pkg_l, luodi_, "r")
    assert lo_l == lo_t == 0 and hi_l < hi_t / 4
    assert _cfg_range(pkg_l, luodi_, "y_int8") == _cfg_range(pkg_t, toolkit, "y_int8")  # the output's own range kept
    # measured 0.107 against 0.162: the rest is the input's own range, which the pixel of 40 stretches for both
    assert np.sqrt(np.mean(err_l**2)) < 0.8 * np.sqrt(np.mean(err_t**2))


def test_bias_correction_removes_the_mean_error_of_the_toolkits_rounded_weights(tmp_path: Path) -> None:
    """Each output channel weighs input 0 by 1 and 63 others by 0.45 steps of the channel's int8 scale (1/255): the
    toolkit rounds those to zero, so every output is off by about -63 x 0.45 / 255 x the mean input; the corrected
    bias takes that offset out (luodi models the toolkit's rounding: per channel, asymmetric, 255 steps)."""
    _need_toolchain()
    w = np.full((2, 64, 1, 1), 0.45 / 255, np.float32)
    w[:, 0] = 1.0
    rng = np.random.default_rng(0)
    calibration = [{"x": (0.9 + 0.1 * rng.random((1, 64, 4, 4))).astype(np.float32)} for _ in range(16)]
    x = (0.9 + 0.1 * rng.random((1, 64, 4, 4))).astype(np.float32)
    model = _conv_model(w, np.zeros(2, np.float32))
    _, off, err_off = _int8_error(model, tmp_path / "off.luodi", calibration, x, bias_correction="false")  # CLI's
    _, on, err_on = _int8_error(model, tmp_path / "on.luodi", calibration, x)  # corrected: the default
    assert off["options"]["corrected_layers"] == 0 and on["options"]["bias_correction"] is True
    assert on["options"]["corrected_layers"] == 1
    assert abs(err_off.mean()) > 0.05  # the offset is there without it
    assert abs(err_on.mean()) < 0.25 * abs(err_off.mean())


def test_unknown_ranges_or_bias_correction_values_are_refused(tmp_path: Path) -> None:
    _need_toolchain()
    for options, match in (
        ({"ranges": "kl"}, "ranges must be luodi or toolkit"),
        ({"bias_correction": "no"}, "true or false"),
    ):
        with pytest.raises(luodi.LuodiError, match=match):
            luodi.compile(
                small_cnn(),
                tmp_path / "a.luodi",
                ["rknn:int8"],
                calibration=_calibration(4),
                target_options={"rknn": options},
                strict=True,
            )
