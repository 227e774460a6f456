"""The litert backend's ONNX route (issue 16): a model that came from ONNX (no torch program) is converted by onnx2tf
in its own toolchain environment (``luodi toolchain install onnx2tf``; `make test` installs it) to a float .tflite,
made full integer by ai-edge-quantizer in luodi's environment, verified at compile time and run in-process with
float and int8 I/O. A detector head that joins pixels and 0..1 scores leaves the int8 file as its parts, each with
its own scale. Without the toolchain the compile names the command that installs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from conftest import detector_head_model, small_cnn
from luodi import toolchain as tc

pytest.importorskip("ai_edge_litert", reason="litert is not installed: pip install 'luodi[litert]'")
pytest.importorskip("ai_edge_quantizer", reason="litert is not installed: pip install 'luodi[litert]'")
pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need Linux memfd")


def _need_toolchain() -> None:
    if not tc.status("onnx2tf").ok:
        pytest.skip("the onnx2tf toolchain is not installed here: luodi toolchain install onnx2tf (make test does)")


def _calibration(n: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[luodi.Package, Path, bytes]:
    """small_cnn from an .onnx file on disk (the converter must never write to it) to fp32 and int8."""
    _need_toolchain()
    folder = tmp_path_factory.mktemp("litert-onnx")
    src = folder / "cnn.onnx"
    onnx.save(small_cnn(), src)
    before = src.read_bytes()
    pkg = luodi.compile(
        str(src), folder / "cnn.luodi", ["onnxruntime", "litert:fp32", "litert:int8"], calibration=_calibration()
    )
    return pkg, src, before


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> luodi.Package:
    _need_toolchain()
    out = tmp_path_factory.mktemp("litert-head") / "head.luodi"
    return luodi.compile(
        detector_head_model(), out, ["onnxruntime", "litert:fp32", "litert:int8"], calibration=_calibration()
    )


def test_an_onnx_source_compiles_through_onnx2tf_and_is_verified(cnn: tuple[luodi.Package, Path, bytes]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    pkg, src, before = cnn
    assert src.read_bytes() == before  # the converter saw a copy in a folder of its own
    for precision in ("fp32", "int8"):
        t = pkg.find_target("litert", precision)
        assert t["status"] == "verified", t.get("reason")
        assert t["options"]["route"] == "onnx2tf" and t["options"]["converter"].startswith("onnx2tf 1.29")
        interp = Interpreter(model_content=pkg.read(t["files"]["model.tflite"]))
        (inp,) = interp.get_input_details()
        assert list(inp["shape"]) == [1, 3, 16, 16]  # NCHW kept at the boundary
        assert inp["dtype"] == (np.int8 if precision == "int8" else np.float32)
    assert "ai-edge-quantizer" in pkg.find_target("litert", "int8")["options"]["converter"]


def test_onnx_route_float_and_int8_round_trips(cnn: tuple[luodi.Package, Path, bytes]) -> None:
    pkg = cnn[0]
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    with luodi.Session(pkg, backend="onnxruntime") as ref:
        want = ref.run({"x": x})["y"]
    with luodi.Session(pkg, backend="litert:fp32") as s:
        np.testing.assert_allclose(s.run({"x": x})["y"], want, rtol=1e-4, atol=1e-4)  # a batch of 2, built at 1
    with (
        luodi.Session(pkg, backend="litert:int8") as s,
        luodi.Session(pkg, backend="litert:int8", raw_int8=True) as raw,
    ):
        spec_in, spec_out = s.inputs[0], s.outputs[0]
        assert spec_in.dtype == "int8" and spec_out.dtype == "int8"
        from_float = s.run({"x": x})["y"]
        np.testing.assert_array_equal(s.run({"x": spec_in.quantise(x)})["y"], from_float)  # int8 in: the same
        got_raw = raw.run({"x": x})["y"]
        assert got_raw.dtype == np.int8
        np.testing.assert_array_equal(spec_out.dequantise(got_raw), from_float)
    assert from_float.shape == (2, 5) and not np.array_equal(from_float, want)  # it did run in int8
    assert np.abs(from_float - want).max() < 0.05 * np.abs(want).max() + 4 * spec_out.scale


def test_a_head_of_pixels_and_scores_is_quantised_as_its_parts_and_nhwc_outputs_come_back_nchw(
    head: luodi.Package,
) -> None:
    """onnx2tf writes 4-D outputs NHWC: the engine transposes them back, so the target reads and writes the graph's
    own tensors. int8: one scale for the joined output would zero every score; each part has its own."""
    fp32, int8 = head.find_target("litert", "fp32"), head.find_target("litert", "int8")
    assert fp32["status"] == "verified" and int8["status"] == "verified", (fp32.get("reason"), int8.get("reason"))
    assert fp32["options"]["perms"] == {"y": [0, 3, 1, 2]}
    assert int8["options"]["joins"] == {"y": {"parts": ["boxes", "scores"], "axis": 1}}
    io = int8["options"]["device_io"]
    assert set(io) == {"x", "boxes", "scores"} and io["scores"]["scale"] < 0.01 < io["boxes"]["scale"]
    ins, outs = head.target_io(int8)
    assert ins[0].dtype == "int8" and outs[0].dtype == "float32"  # joined on the host from parts of unlike scales
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    with luodi.Session(head, backend="onnxruntime") as ref:
        want = ref.run({"x": x})["y"]
    with luodi.Session(head, backend="litert:fp32") as s:
        np.testing.assert_allclose(s.run({"x": x})["y"], want, rtol=1e-4, atol=1e-3)
    with luodi.Session(head, backend="litert:int8") as s:
        got = s.run({"x": x})["y"]
        assert np.array_equal(s.run({"x": ins[0].quantise(x)})["y"], got)
    assert got.shape == want.shape == (2, 6, 16, 16) and got.dtype == np.float32
    assert np.abs(got[:, 4:] - want[:, 4:]).max() < 0.03  # scores: steps of 1/256 (one shared scale: all lost)
    assert np.abs(got[:, :4] - want[:, :4]).max() < 0.05 * want[:, :4].max()


def test_the_converter_never_reaches_for_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """onnx2tf fetches sample images from GitHub when every input's last axis is 3 (an NHWC image, as it sees it;
    here a width of 3) unless a local sample file is in its working folder. Every proxy points at a closed port, so
    a fetch fails the conversion."""
    _need_toolchain()
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 3])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    pkg = luodi.compile(model, tmp_path / "narrow.luodi", ["onnxruntime", "litert:fp32"])
    t = pkg.find_target("litert", "fp32")
    assert t["status"] == "verified", t.get("reason")
    assert t["options"]["perms"] == {"y": [0, 3, 1, 2]}


def test_the_toolchain_runs_onnxsim_as_a_command() -> None:
    """onnx2tf runs ``onnxsim`` from PATH; the environment's console scripts must name its own Python (they were
    written in the temporary folder it was built in)."""
    _need_toolchain()
    st = tc.status("onnx2tf")
    script = st.path / "bin" / "onnxsim"
    assert script.read_text().splitlines()[0] == f"#!{st.path}/bin/python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


def test_a_missing_onnx2tf_toolchain_names_its_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUODI_TOOLCHAINS_DIR", str(tmp_path))
    pkg = luodi.compile(small_cnn(), tmp_path / "m.luodi", ["onnxruntime", "litert:fp32"])
    t = pkg.find_target("litert", "fp32")
    assert t["status"] == "failed"
    assert "came from ONNX" in t["reason"] and "luodi toolchain install onnx2tf" in t["reason"]
    assert "exported from PyTorch" in t["reason"]  # and the route that needs no toolchain
    with pytest.raises(luodi.BackendUnavailableError, match="luodi toolchain install onnx2tf"):
        tc.python_for("onnx2tf", "litert")
