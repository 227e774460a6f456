"""The six verbs and run() on every built-in backend, and the errors for bad input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import luodi

BACKENDS = ["onnxruntime", "reference"]


def ort_outputs(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_six_verbs(cnn_package, cnn_model, backend):
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with luodi.Session(cnn_package, backend=backend) as s:
        assert s.backend == backend
        assert [i.name for i in s.inputs] == ["x"] and s.inputs[0].shape == ("batch", 3, 16, 16)
        assert [o.name for o in s.outputs] == ["y"] and s.outputs[0].dtype == "float32"
        s.prepare({"x": (2, 3, 16, 16)})
        s.set_tensor("x", x)
        s.forward()
        y = s.get_tensor("y")
        assert y.shape == (2, 5)
        np.testing.assert_allclose(y, ort_outputs(cnn_model, x), rtol=1e-5, atol=1e-5)
        assert s.get_tensor("x") is x
        np.testing.assert_array_equal(s.run({"x": x})["y"], y)
    with pytest.raises(luodi.StateError, match="closed"):
        s.run({"x": x})


def test_backends_agree_and_batch_is_dynamic(cnn_package):
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with luodi.Session(cnn_package, backend="onnxruntime") as a, luodi.Session(cnn_package, backend="reference") as b:
        np.testing.assert_allclose(a.run({"x": x})["y"], b.run({"x": x})["y"], rtol=1e-5, atol=1e-5)
        one = a.run({"x": x[:1]})["y"]
        np.testing.assert_allclose(one, a.run({"x": x})["y"][:1], rtol=1e-6, atol=1e-6)


def test_auto_picks_a_runnable_target_and_says_why(cnn_package):
    with luodi.Session(cnn_package) as s:
        assert s.backend == "onnxruntime"
        assert s.selection.startswith("onnxruntime:fp32: the only target that runs here")


def test_session_on_a_plain_onnx_file(tmp_path, cnn_model):
    path = tmp_path / "m.onnx"
    path.write_bytes(cnn_model.SerializeToString())
    x = np.ones((1, 3, 16, 16), np.float32)
    with luodi.Session(path) as s:
        np.testing.assert_allclose(s.run({"x": x})["y"], ort_outputs(cnn_model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype_names_input_expected_and_given(cnn_package, backend):
    with luodi.Session(cnn_package, backend=backend) as s:
        with pytest.raises(luodi.DTypeError) as e:
            s.set_tensor("x", np.zeros((1, 3, 16, 16), np.float64))
        assert "'x'" in str(e.value) and "float32" in str(e.value) and "float64" in str(e.value)
        assert isinstance(e.value, luodi.LuodiError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_shape_names_input_expected_and_given(cnn_package, backend):
    with luodi.Session(cnn_package, backend=backend) as s:
        with pytest.raises(luodi.ShapeError) as e:
            s.run({"x": np.zeros((1, 3, 20, 16), np.float32)})
        msg = str(e.value)
        assert "'x'" in msg and "[batch, 3, 16, 16]" in msg and "[1, 3, 20, 16]" in msg
        with pytest.raises(luodi.ShapeError, match="expects shape"):
            s.set_tensor("x", np.zeros((3, 16, 16), np.float32))
        with pytest.raises(luodi.ShapeError):
            s.prepare({"x": (1, 4, 16, 16)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_name_lists_the_real_names(cnn_package, backend):
    with luodi.Session(cnn_package, backend=backend) as s:
        with pytest.raises(luodi.UnknownTensorError) as e:
            s.set_tensor("images", np.zeros((1, 3, 16, 16), np.float32))
        assert "'images'" in str(e.value) and "['x']" in str(e.value)
        with pytest.raises(luodi.UnknownTensorError):
            s.get_tensor("nope")
        with pytest.raises(luodi.MissingInputError, match="x"):
            s.run({})
        with pytest.raises(luodi.MissingInputError, match="set_tensor"):
            s.forward()
        with pytest.raises(luodi.StateError, match="forward"):
            s.get_tensor("y")


def test_nested_lists_are_converted_to_the_input_dtype(cnn_package):
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16))  # float64 nested lists, as JSON gives them
    with luodi.Session(cnn_package, backend="onnxruntime") as s:
        y = s.run({"x": x.tolist()})["y"]
        expected = s.run({"x": x.astype(np.float32)})["y"]
    assert y.dtype == np.float32 and y.shape == (1, 5)
    np.testing.assert_array_equal(y, expected)  # converted to float32 exactly as an array of that dtype would be
    assert np.abs(expected).max() > 0.1  # a real output, not zeros on both sides


def test_unknown_backend_and_missing_target(cnn_package):
    with pytest.raises(luodi.BackendNotFoundError, match="onnxruntime"):
        luodi.Session(cnn_package, backend="tpu-magic")
    with pytest.raises(luodi.PackageError, match="no target onnxruntime:int8"):
        luodi.Session(cnn_package, backend="onnxruntime", precision="int8")


def test_cuda_device_without_gpu_says_what_to_install(cnn_package):
    if "cuda" in luodi.get_backend("onnxruntime").available().devices:
        pytest.skip("this host has CUDA; the no-GPU error path cannot be shown here")
    with pytest.raises(luodi.BackendUnavailableError, match=r"luodi\[cuda\]"):
        luodi.Session(cnn_package, backend="onnxruntime", device="cuda")
    with pytest.raises(luodi.BackendUnavailableError, match="no target .* can run here on device 'cuda'"):
        luodi.Session(cnn_package, device="cuda")


def test_cuda_sessions_own_their_streams(cnn_package):
    if "cuda" not in luodi.get_backend("onnxruntime").available().devices:
        pytest.skip("no CUDA execution provider here (needs onnxruntime-gpu and an NVIDIA GPU)")
    x = np.ones((1, 3, 16, 16), np.float32)
    with luodi.Session(cnn_package, device="cuda") as a, luodi.Session(cnn_package, device="cuda") as b:
        assert a._engine._stream.handle.value != b._engine._stream.handle.value
        np.testing.assert_allclose(a.run({"x": x})["y"], b.run({"x": x})["y"], rtol=1e-3, atol=1e-3)
