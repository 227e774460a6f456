"""The OpenVINO backend: IR compile, explicit precision, dynamic batch, threads, errors, EfficientNet-Lite0."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("openvino", reason="openvino is not installed: pip install 'luodi[openvino]'")

import luodi  # noqa: E402
from luodi.backends import LoadOptions, get_backend  # noqa: E402
from luodi.zoo.images import foolbox_imagenet  # noqa: E402


def _engine(pkg_path, precision: str = "fp32", **load: object):
    pkg = luodi.Package(pkg_path)
    return get_backend("openvino").load(pkg.artifact(pkg.find_target("openvino", precision)), LoadOptions(**load))


def _cpu_runs_bf16() -> bool:
    """OpenVINO runs bf16 only on CPUs that have it (AVX512_BF16 or AMX); elsewhere it must refuse."""
    return "bf16" in get_backend("openvino").device_precisions()["CPU"]


def _outputs_record(pkg_path, precision: str) -> dict:
    return luodi.Package(pkg_path).find_target("openvino", precision)["verification"]


@pytest.fixture(scope="module")
def cnn_ov(tmp_path_factory, cnn_model):
    out = tmp_path_factory.mktemp("ov") / "cnn.luodi"
    luodi.compile(cnn_model, out, targets=["openvino", "openvino:bf16", "onnxruntime"], name="small-cnn")
    return out


@pytest.fixture(scope="module")
def effnet_ov(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov-zoo") / "efficientnet-lite0.luodi"
    luodi.compile("zoo:efficientnet-lite0", out, targets=["openvino", "openvino:bf16", "onnxruntime"])
    return out


def det_model() -> onnx.ModelProto:
    """x [batch,3,3] -> MatMul(x, x) -> Det: Det (opset 11) has no OpenVINO ONNX-frontend conversion."""
    nodes = [
        helper.make_node("MatMul", ["x", "x"], ["sq"], name="square"),
        helper.make_node("Det", ["sq"], ["y"], name="determinant"),
    ]
    graph = helper.make_graph(
        nodes,
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# -- compile ----------------------------------------------------------------------------------------
def test_compile_writes_ir_and_records_precision(cnn_ov):
    pkg = luodi.Package(cnn_ov)
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        target = pkg.find_target("openvino", precision)
        assert set(target["files"]) == {"model.xml", "model.bin"}
        assert target["options"]["inference_precision_hint"] == hint
        assert target["options"]["precision"] == precision
        assert target["options"]["performance_hint"] == "LATENCY"
        assert target["engine_version"]
    xml = pkg.artifact(pkg.find_target("openvino", "fp32")).files["model.xml"].decode()
    assert "<net " in xml and 'names="x"' in xml and 'names="y"' in xml


def test_fp32_verification_is_tight(cnn_ov):
    ver = _outputs_record(cnn_ov, "fp32")
    assert ver["passed"] and ver["outputs"]["y"]["max_abs"] <= 1e-4


def test_bf16_verification_passes_and_is_really_bf16(cnn_ov):
    fp32, bf16 = _outputs_record(cnn_ov, "fp32"), _outputs_record(cnn_ov, "bf16")
    if not _cpu_runs_bf16():  # the target is kept, failed with the reason, never run silently in f32
        assert not bf16["passed"] and "without BF16" in bf16["error"], bf16
        return
    assert bf16["passed"], bf16
    assert bf16["outputs"]["y"]["cosine"] >= 0.995
    # a bf16 run loses bits: if it were as exact as fp32, the hint would not have been applied
    assert bf16["outputs"]["y"]["max_abs"] > 10 * fp32["outputs"]["y"]["max_abs"]


def test_inference_precision_is_explicit(cnn_ov):
    engine = _engine(cnn_ov, "fp32")
    try:
        assert engine.compiled_model.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        assert str(engine.compiled_model.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    finally:
        engine.close()
    if _cpu_runs_bf16():
        engine = _engine(cnn_ov, "bf16")
        try:
            assert engine.compiled_model.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        finally:
            engine.close()
    else:
        with pytest.raises(luodi.BackendUnavailableError, match="cannot run bf16 on CPU here"):
            _engine(cnn_ov, "bf16")
    with luodi.Session(cnn_ov, backend="openvino", precision="fp32") as s:
        assert s._engine.inference_precision == "f32"


def test_fp16_runs_where_the_device_has_it_and_is_refused_elsewhere(cnn_model, tmp_path):
    backend = get_backend("openvino")
    out = tmp_path / "fp16.luodi"
    luodi.compile(cnn_model, out, targets=["openvino", "openvino:fp16"])
    fp32, fp16 = _outputs_record(out, "fp32"), _outputs_record(out, "fp16")
    if "fp16" not in backend.device_precisions()["CPU"]:  # the target is kept, failed with the reason
        assert not fp16["passed"] and "FP16" in fp16["error"], fp16
        assert "fp16" not in backend.available().precisions
        return
    assert fp16["passed"], fp16  # e.g. AVX512_FP16 (Sapphire Rapids)
    # an fp16 run loses bits: were it as exact as fp32, the hint would not have been applied
    assert fp16["outputs"]["y"]["max_abs"] > 10 * fp32["outputs"]["y"]["max_abs"]
    engine = _engine(out, "fp16")
    try:
        assert engine.inference_precision == "f16"
    finally:
        engine.close()


def test_threads_option_sets_inference_num_threads(cnn_ov):
    engine = _engine(cnn_ov, threads=1)
    try:
        assert engine.compiled_model.get_property("INFERENCE_NUM_THREADS") == 1
    finally:
        engine.close()


# -- run --------------------------------------------------------------------------------------------
def test_session_equals_onnxruntime(cnn_ov):
    x = np.random.default_rng(3).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with luodi.Session(cnn_ov, backend="openvino") as ov, luodi.Session(cnn_ov, backend="onnxruntime") as ort:
        got, want = ov.run({"x": x}), ort.run({"x": x})
        assert list(got) == ["y"] and got["y"].dtype == np.float32
        np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=1e-5)
        # the six-verb path gives the same numbers
        ov.set_tensor("x", x)
        ov.forward()
        np.testing.assert_array_equal(ov.get_tensor("y"), got["y"])


def test_dynamic_batch_and_prepare(cnn_ov):
    rng = np.random.default_rng(4)
    with luodi.Session(cnn_ov, backend="openvino") as ov, luodi.Session(cnn_ov, backend="onnxruntime") as ort:
        for batch in (1, 4, 2):
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            got = ov.run({"x": x})["y"]
            assert got.shape == (batch, 5)
            np.testing.assert_allclose(got, ort.run({"x": x})["y"], atol=1e-5)
        ov.prepare({"x": (2, 3, 16, 16)})  # static plan for batch 2; other batches still run
        for batch in (2, 3, 2):
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            np.testing.assert_allclose(ov.run({"x": x})["y"], ort.run({"x": x})["y"], atol=1e-5)


def test_outputs_survive_the_next_run_and_inputs_need_not_be_contiguous(cnn_ov):
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(2))
    with luodi.Session(cnn_ov, backend="openvino") as s:
        first = s.run({"x": a})["y"]
        kept = first.copy()
        s.run({"x": b})
        np.testing.assert_array_equal(first, kept)
        strided = np.asfortranarray(a)
        np.testing.assert_array_equal(s.run({"x": strided})["y"], kept)


def test_eight_threads_bit_identical(cnn_ov):
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    with luodi.Session(cnn_ov, backend="openvino") as s:
        expected = [s.run({"x": x})["y"].copy() for x in inputs]
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        mismatches: list[int] = []

        def worker(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(25):
                    if not np.array_equal(s.run({"x": inputs[i]})["y"], expected[i]):
                        mismatches.append(i)
                    s.set_tensor("x", inputs[i])
                    s.forward()
                    if not np.array_equal(s.get_tensor("y"), expected[i]):
                        mismatches.append(i)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert not mismatches
        assert all(not t.is_alive() for t in threads)


# -- errors -----------------------------------------------------------------------------------------
def test_unsupported_op_is_named_at_compile_and_nothing_is_written(tmp_path):
    out = tmp_path / "det.luodi"
    with pytest.raises(luodi.UnsupportedOpError) as info:
        luodi.compile(det_model(), out, targets=["onnxruntime", "openvino"], strict=True)
    msg = str(info.value)
    assert "Det" in msg and "'determinant'" in msg and "openvino" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_device_names_the_present_ones(cnn_ov):
    for device in ("gpu", "gpu:1", "npu"):
        if device.split(":")[0] in get_backend("openvino").available().devices and device != "gpu:1":
            continue
        with pytest.raises(luodi.BackendUnavailableError, match=r"CPU"):
            luodi.Session(cnn_ov, backend="openvino", device=device)
    with pytest.raises(luodi.BackendUnavailableError, match=r"'cpu', 'gpu\[:N\]' or 'npu'"):
        luodi.Session(cnn_ov, backend="openvino", device="tpu")


def test_available_reports_devices_and_precisions():
    avail = get_backend("openvino").available()
    assert avail.ok and avail.version and "cpu" in avail.devices
    assert "fp32" in avail.precisions
    per_device = get_backend("openvino").device_precisions()
    assert "CPU" in per_device and "fp32" in per_device["CPU"]


# -- EfficientNet-Lite0 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_efficientnet_fp32_and_bf16_verification(effnet_ov):
    fp32, bf16 = _outputs_record(effnet_ov, "fp32"), _outputs_record(effnet_ov, "bf16")
    assert fp32["passed"] and fp32["outputs"]["logits"]["max_abs"] <= 2e-4, fp32
    if not _cpu_runs_bf16():
        assert not bf16["passed"] and "without BF16" in bf16["error"], bf16
        return
    assert bf16["passed"], bf16
    assert 0.995 <= bf16["outputs"]["logits"]["cosine"] <= 1.0
    print(
        f"\nEfficientNet-Lite0 openvino fp32 max_abs={fp32['outputs']['logits']['max_abs']:.3g} "
        f"cosine={fp32['outputs']['logits']['cosine']:.8f}; bf16 max_abs={bf16['outputs']['logits']['max_abs']:.3g} "
        f"cosine={bf16['outputs']['logits']['cosine']:.6f}"
    )


def test_efficientnet_top1_matches_onnxruntime(effnet_ov):
    images = foolbox_imagenet()
    assert len(images) == 20
    with luodi.Session(effnet_ov, backend="openvino") as ov, luodi.Session(effnet_ov, backend="onnxruntime") as ort:
        got = [ov.predict(path, k=1)[0].index for path, _ in images]
        want = [ort.predict(path, k=1)[0].index for path, _ in images]
    assert got == want
    assert sum(g == label for g, (_, label) in zip(got, images)) >= 16
