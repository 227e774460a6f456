"""The ncnn backend: pnnx conversion at compile time, explicit precision, batch loop, threads, errors."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from luodi.backends import CompileOptions, LoadOptions, get_backend

if importlib.util.find_spec("ncnn") is None or importlib.util.find_spec("pnnx") is None:
    pytest.skip("ncnn and pnnx are not installed (pip install 'luodi[ncnn]')", allow_module_level=True)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def tiny_model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture(scope="module")
def ncnn_package(tmp_path_factory, cnn_model):
    out = tmp_path_factory.mktemp("ncnn") / "cnn.luodi"
    return luodi.compile(cnn_model, out, targets=["ncnn", "ncnn:fp16", "onnxruntime"], name="small-cnn")


@pytest.fixture(scope="module")
def effnet_ncnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("ncnn-zoo") / "efficientnet-lite0.luodi"
    return luodi.compile("zoo:efficientnet-lite0", out, targets=["ncnn", "onnxruntime"])


def target(pkg: luodi.Package, precision: str) -> dict:
    return next(t for t in pkg.targets if t["backend"] == "ncnn" and t["precision"] == precision)


def test_fp32_compile_verifies_and_maps_blobs(ncnn_package):
    t = target(ncnn_package, "fp32")
    ver = t["verification"]
    assert ver["passed"], ver
    assert ver["outputs"]["y"]["max_abs"] <= 1e-4
    assert set(t["files"]) == {"model.param", "model.bin"}
    opts = t["options"]
    assert [(d["blob"], d["name"]) for d in opts["inputs"]] == [("in0", "x")]
    assert [(d["blob"], d["name"]) for d in opts["outputs"]] == [("out0", "y")]
    assert opts["converter"].startswith("pnnx ")


def test_precision_flags_are_explicit(ncnn_package):
    fp32 = target(ncnn_package, "fp32")["options"]["precision_flags"]
    assert {"use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"} <= set(fp32)
    assert not any(fp32.values()), fp32
    fp16_target = target(ncnn_package, "fp16")
    fp16 = fp16_target["options"]["precision_flags"]
    assert fp16["use_fp16_storage"] and fp16["use_fp16_arithmetic"] and not fp16["use_bf16_storage"]
    assert fp16_target["verification"]["passed"], fp16_target["verification"]
    # the loaded net really has them off (ncnn's defaults would lower precision)
    backend = get_backend("ncnn")
    artifact = ncnn_package.artifact(target(ncnn_package, "fp32"))
    engine = backend.load(artifact, LoadOptions(threads=3))
    try:
        opt = engine._net.opt
        assert engine.num_threads == 3
        assert not (opt.use_fp16_storage or opt.use_fp16_arithmetic or opt.use_fp16_packed or opt.use_bf16_storage)
    finally:
        engine.close()


def test_session_matches_onnxruntime_at_batch_1_4_2(ncnn_package, cnn_model):
    with luodi.Session(ncnn_package, backend="ncnn") as s:
        assert (s.backend, s.precision) == ("ncnn", "fp32")
        for n in (1, 4, 2):
            x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
            y = s.run({"x": x})["y"]
            assert y.shape == (n, 5) and y.dtype == np.float32
            np.testing.assert_allclose(y, ort_run(cnn_model, {"x": x})[0], rtol=1e-5, atol=1e-5)
        s.prepare({"x": (3, 3, 16, 16)})
        x = np.ones((3, 3, 16, 16), np.float32)
        s.set_tensor("x", x)
        s.forward()
        np.testing.assert_allclose(s.get_tensor("y"), ort_run(cnn_model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_fp16_session_within_fp16_tolerance(ncnn_package, cnn_model):
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = ort_run(cnn_model, {"x": x})[0]
    with luodi.Session(ncnn_package, backend="ncnn", precision="fp16") as s:
        y = s.run({"x": x})["y"]
    err = np.abs(y - ref).max()
    assert err <= 1e-2 * max(1.0, np.abs(ref).max()), err


def test_eight_threads_bit_identical(ncnn_package):
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    with luodi.Session(ncnn_package, backend="ncnn") as s:
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
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert not mismatches
        assert all(not t.is_alive() for t in threads)


def test_in_place_first_layer_multiple_inputs_and_outputs():
    # A leading ReLU works in place in ncnn: a Mat aliasing numpy memory used to crash it.
    model = tiny_model(
        [
            helper.make_node("Relu", ["b"], ["rb"]),
            helper.make_node("Sigmoid", ["a"], ["sa"]),
            helper.make_node("Tanh", ["rb"], ["z"]),
        ],
        [vi("b", ["n", 4, 5]), vi("a", ["n", 7])],
        [vi("z", ["n", 4, 5]), vi("sa", ["n", 7])],
    )
    rng = np.random.default_rng(3)
    with luodi.Session(model, backend="ncnn") as s:
        for n in (1, 3):
            b = rng.standard_normal((n, 4, 5)).astype(np.float32)
            a = rng.standard_normal((n, 7)).astype(np.float32)
            b0 = b.copy()
            got = s.run({"b": b, "a": a})
            z, sa = ort_run(model, {"b": b, "a": a})
            np.testing.assert_allclose(got["z"], z, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["sa"], sa, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(b, b0)  # the caller's input is untouched


def test_fixed_shapes_run_whole_and_gemm_with_a_runtime_weight():
    # [3,4,5] has no batch axis for pnnx: one extraction on the whole array, softmax on axis 1.
    # Gemm(transB=1) with a run-time weight is lowered to Transpose + Gemm before pnnx.
    model = tiny_model(
        [
            helper.make_node("Softmax", ["x"], ["s"], axis=1),
            helper.make_node("Gemm", ["a", "b"], ["g"], transB=1),
        ],
        [vi("x", [3, 4, 5]), vi("a", [3, 6]), vi("b", [4, 6])],
        [vi("s", [3, 4, 5]), vi("g", [3, 4])],
    )
    rng = np.random.default_rng(4)
    feeds = {
        k: rng.standard_normal(shape).astype(np.float32)
        for k, shape in [("x", (3, 4, 5)), ("a", (3, 6)), ("b", (4, 6))]
    }
    with luodi.Session(model, backend="ncnn") as s:
        got = s.run(feeds)
    want_s, want_g = ort_run(model, feeds)
    np.testing.assert_allclose(got["s"], want_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["g"], want_g, rtol=1e-5, atol=1e-5)


def test_unsupported_op_fails_at_compile_and_writes_nothing(tmp_path):
    # Hardmax: pnnx passes it through by its ONNX name and ncnn has no such layer.
    model = tiny_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Hardmax", ["r"], ["y"], name="pick_max", axis=1),
        ],
        [vi("x", ["batch", 3, 8, 8])],
        [vi("y", ["batch", 3, 8, 8])],
    )
    out = tmp_path / "bad.luodi"
    with pytest.raises(luodi.UnsupportedOpError, match=r"ncnn.*Hardmax.*pick_max") as info:
        luodi.compile(model, out, targets=["ncnn"])
    assert "ncnn" in str(info.value) and "Hardmax" in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(luodi.UnsupportedOpError, match="Hardmax"):
        get_backend("ncnn").compile(model, CompileOptions())


def test_missing_pnnx_names_the_extra(cnn_model, monkeypatch):
    import luodi.backends.ncnn as ncnn_backend

    monkeypatch.setattr(ncnn_backend, "_pnnx_executable", lambda: None)
    with pytest.raises(luodi.BackendUnavailableError, match=r"pnnx.*luodi\[ncnn\]"):
        get_backend("ncnn").compile(cnn_model, CompileOptions())


def test_unknown_precision_is_a_compile_error(cnn_model):
    with pytest.raises(luodi.CompileError, match="bf16"):
        get_backend("ncnn").compile(cnn_model, CompileOptions(precision="bf16"))
    with pytest.raises(luodi.CompileError, match="calibration data"):  # int8 is calibrated on the compile's samples
        get_backend("ncnn").compile(cnn_model, CompileOptions(precision="int8"))


# -- ncnn:int8: scales calibrated by ncnn and written into pnnx's fp32 model; ncnn quantises the weights at load ----
def _calibration(n: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


def test_int8_is_written_verified_and_runs_in_int8(tmp_path, cnn_model):
    pkg = luodi.compile(
        cnn_model, tmp_path / "q.luodi", ["onnxruntime", "ncnn", "ncnn:int8"], calibration=_calibration()
    )
    t = pkg.find_target("ncnn", "int8")
    assert t["status"] == "verified" and t["options"]["int8"]["layers"] == 2  # the Conv and the Gemm
    q = t["quantization"]
    assert q["policy"] == "ncnn's own toolkit" and q["passed"] and q["agreement"] >= 0.9 and q["cosine"] > 0.99
    x = np.random.default_rng(5).random((3, 3, 16, 16), dtype=np.float32)
    ref = ort_run(cnn_model, {"x": x})[0]
    with luodi.Session(pkg, backend="ncnn:int8") as s8, luodi.Session(pkg, backend="ncnn") as s32:
        got, fp32 = s8.run({"x": x})["y"], s32.run({"x": x})["y"]
    assert got.shape == (3, 5) and got.dtype == np.float32  # float boundary: ncnn quantises inside
    np.testing.assert_allclose(fp32, ref, rtol=0, atol=1e-4)
    assert np.abs(got - fp32).max() > 1e-3  # it did compute in int8 ...
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99 and (got.argmax(1) == ref.argmax(1)).all()  # ... and close to the float model


def test_int8_scales_sit_after_each_layers_weights(cnn_model):
    backend = get_backend("ncnn")
    fp32 = backend.compile(cnn_model, CompileOptions())
    old = {"ranges": "maxabs", "bias_correction": False}  # ncnn2table's max-abs, pnnx's biases: the layout alone
    int8 = backend.compile(cnn_model, CompileOptions(precision="int8", calibration=tuple(_calibration(8)), extra=old))
    text = int8.files["model.param"].decode()
    assert " 8=2" in next(ln for ln in text.splitlines() if ln.startswith("Convolution"))
    assert " 8=2" in next(ln for ln in text.splitlines() if ln.startswith("InnerProduct"))
    # Conv 3->8 3x3 with bias, then Gemm 8->5 with bias: 8 + 1 and 5 + 1 scales, placed after each layer's floats
    a, b = fp32.files["model.bin"], int8.files["model.bin"]
    assert len(b) == len(a) + 4 * (8 + 1 + 5 + 1)
    conv_end = 4 + 216 * 4 + 8 * 4
    assert b[:conv_end] == a[:conv_end] and b[conv_end + 36 : conv_end + 36 + 184] == a[conv_end:]
    w = np.frombuffer(a, np.float32, 216, 4).reshape(8, -1)
    np.testing.assert_allclose(np.frombuffer(b, np.float32, 8, conv_end), 127 / np.abs(w).max(1), rtol=1e-6)
    rows = [np.asarray(f["x"][0]) for f in _calibration(8)]
    assert np.frombuffer(b, np.float32, 1, conv_end + 32)[0] == np.float32(127 / max(np.abs(r).max() for r in rows))
    with pytest.raises(luodi.NotApplicableError, match="keeps float inputs and outputs"):
        backend.compile(cnn_model, CompileOptions(precision="int8", calibration=tuple(_calibration(2)), int8_io=True))


def _conv_pair(w1: np.ndarray, w2: np.ndarray, hw: int) -> onnx.ModelProto:
    """Conv(w1, 1x1, zero bias) -> Relu ``r`` -> Conv(w2, 1x1, zero bias) ``y``: two int8 layers, ``r`` the second's
    input (not a model input)."""
    b1, b2 = np.zeros(w1.shape[0], np.float32), np.zeros(w2.shape[0], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    return tiny_model(nodes, [vi("x", ["n", w1.shape[1], hw, hw])], [vi("y", ["n", w2.shape[0], hw, hw])], inits)


def _int8_error(model, calibration, x, **extra) -> tuple[np.ndarray, bytes, dict]:
    """ncnn:int8's output minus onnxruntime's on ``x``, the int8 model.bin and the compile's int8 record."""
    backend = get_backend("ncnn")
    art = backend.compile(model, CompileOptions(precision="int8", calibration=tuple(calibration), extra=extra))
    engine = backend.load(art, LoadOptions(threads=1))
    try:
        got = engine.run({"x": x})["y"]
    finally:
        engine.close()
    return got - ort_run(model, {"x": x})[0], art.files["model.bin"], art.options["int8"]


def test_int8_mse_ranges_clip_an_outlier_that_max_abs_spreads_over_every_step():
    """One calibration pixel of 8 among 16 pictures of 128 x 128 pixels in [0, 1) stretches max |r| (the second
    Conv's input) 8 times; the default MSE threshold clips those 8 values for finer steps on the 2 million others
    (it pays once clipping costs less than the rounding noise of every value), and inputs without the outlier lose
    less. The model's input keeps max |x|, the outlier's, for both."""
    rng = np.random.default_rng(0)
    w1, w2 = np.abs(rng.standard_normal((8, 3, 1, 1))).astype(np.float32), rng.standard_normal((4, 8, 1, 1))
    model = _conv_pair(w1, w2.astype(np.float32), 128)
    calibration = [{"x": rng.random((1, 3, 128, 128), dtype=np.float32)} for _ in range(16)]
    calibration[0]["x"][0, :, 0, 0] = 8.0
    x = rng.random((2, 3, 128, 128), dtype=np.float32)
    err_max, bin_max, rec_max = _int8_error(model, calibration, x, ranges="maxabs", bias_correction=False)
    err_mse, bin_mse, rec_mse = _int8_error(model, calibration, x, bias_correction="false")  # mse: the default
    assert rec_max["ranges"] == "maxabs" and rec_mse["ranges"] == "mse" and rec_mse["corrected_layers"] == 0
    # .bin: conv1 = tag, 24 weights, 8 biases, 8 weight scales, its input's scale; conv2 = tag, 32, 4, 4, its input's
    at1, at2 = 4 + 4 * (24 + 8 + 8), 4 + 4 * (24 + 8 + 8 + 1) + 4 + 4 * (32 + 4 + 4)
    scale = lambda b, at: float(np.frombuffer(b, np.float32, 1, at)[0])  # noqa: E731
    assert scale(bin_mse, at1) == scale(bin_max, at1) == np.float32(127 / 8)  # the model's input: max |x|, kept
    r_peak = max(float(np.maximum(0, np.einsum("oc,nchw->nohw", w1[:, :, 0, 0], f["x"])).max()) for f in calibration)
    np.testing.assert_allclose(scale(bin_max, at2), 127 / r_peak, rtol=1e-5)  # maxabs: the outlier's
    assert scale(bin_mse, at2) > 3 * scale(bin_max, at2)  # mse: a third of it or less (measured: 1/4.4)
    assert np.sqrt(np.mean(err_mse**2)) < 0.7 * np.sqrt(np.mean(err_max**2))  # measured 0.101 against 0.205


def test_int8_bias_correction_removes_the_mean_error_of_ncnns_rounded_weights():
    """Each output channel weighs input 0 by 1 and 63 others by 0.45 of a step of its int8 scale (127 / max |w|, so
    1/127): ncnn rounds those to zero at load, so every output would be off by -63 x 0.45 / 127 x the mean input.
    The corrected bias (the default) is b - sum((w_q - w) E[x]) exactly, and ncnn's output has no offset left."""
    w = np.full((2, 64, 1, 1), 0.45 / 127, np.float32)
    w[:, 0] = 1.0
    rng = np.random.default_rng(0)
    calibration = [{"x": (0.9 + 0.1 * rng.random((1, 64, 4, 4))).astype(np.float32)} for _ in range(16)]
    x = (0.9 + 0.1 * rng.random((1, 64, 4, 4))).astype(np.float32)
    b = np.zeros(2, np.float32)
    model = tiny_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [vi("x", ["n", 64, 4, 4])],
        [vi("y", ["n", 2, 4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    err, weights, record = _int8_error(model, calibration, x)  # corrected: the default
    assert record["bias_correction"] is True and record["corrected_layers"] == 1
    mean_x = np.mean([f["x"][0].mean((1, 2)) for f in calibration], axis=0)
    offset = w[:, 1:, 0, 0].astype(np.float64) @ mean_x[1:]  # -(w_q - w) E[x]: w_q is 1 on input 0, 0 elsewhere
    assert offset.min() > 0.2  # what the rounding loses: 63 x 0.45 / 127 x 0.95
    np.testing.assert_allclose(np.frombuffer(weights, np.float32, 2, 4 + 4 * 128), offset, rtol=1e-5)  # b = 0 + it
    assert abs(err.mean()) < 0.1 * offset.min()  # and ncnn's output has lost it


def test_int8_options_are_checked_before_any_work(cnn_model, tmp_path):
    backend = get_backend("ncnn")
    for extra, match in (
        ({"ranges": "kl"}, "ranges must be one of mse, percentile, maxabs"),
        ({"bias_correction": "no"}, "true or false"),
    ):
        with pytest.raises(luodi.CompileError, match=match):
            backend.check_compile_options(extra, "int8")
        with pytest.raises(luodi.CompileError, match=match):  # before calibration data is even looked for
            luodi.compile(cnn_model, tmp_path / "x.luodi", ["ncnn:int8"], target_options={"ncnn": extra})
    backend.check_compile_options({"ranges": "maxabs", "bias_correction": "false"}, "int8")


@pytest.mark.slow
def test_efficientnet_lite0_verifies_and_agrees_with_onnxruntime(effnet_ncnn):
    from luodi.zoo.images import foolbox_imagenet

    ver = target(effnet_ncnn, "fp32")["verification"]
    assert ver["passed"] and ver["outputs"]["logits"]["max_abs"] <= 2e-4, ver
    images = foolbox_imagenet()
    assert len(images) == 20
    paths = [p for p, _ in images]
    with luodi.Session(effnet_ncnn, backend="ncnn") as a, luodi.Session(effnet_ncnn, backend="onnxruntime") as b:
        top_ncnn = [r[0].index for r in a.predict(paths, k=1)]
        top_ort = [r[0].index for r in b.predict(paths, k=1)]
    assert top_ncnn == top_ort
    assert sum(t == label for t, (_, label) in zip(top_ncnn, images)) >= 16
