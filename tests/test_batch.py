"""Session.run_batch and Session.reshape on every backend: batched results equal per-sample runs, in input order.

Each backend runs the small CNN (dynamic batch) and a fully convolutional model (dynamic batch, height and width, so
samples of several shapes form groups); torch runs a small PyTorch module. The number of engine calls is counted,
so a run_batch that quietly ran one sample at a time would fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import luodi
from conftest import fcn_model, installed, small_cnn

ENGINES = ["onnxruntime", "reference", "openvino", "ncnn", "mnn"]
TOL = {"rtol": 1e-4, "atol": 1e-4}


def need(backend: str) -> None:
    a = luodi.get_backend(backend).available()
    if not a.ok:
        pytest.skip(f"{backend}: {a.reason} ({a.install})")


def _targets() -> list[str]:
    return [b for b in ENGINES if installed(b)]


def fixed_batch_cnn(batch: int) -> onnx.ModelProto:
    model = small_cnn()
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.fixture(scope="module")
def cnn_pkg(tmp_path_factory):
    return luodi.compile(small_cnn(), tmp_path_factory.mktemp("batch") / "cnn.luodi", targets=_targets())


@pytest.fixture(scope="module")
def fcn_pkg(tmp_path_factory):
    return luodi.compile(fcn_model(), tmp_path_factory.mktemp("batch") / "fcn.luodi", targets=_targets())


def counted(session: luodi.Session) -> list[int]:
    """Count the session's engine calls (and their batch sizes); the engine itself runs as usual."""
    calls: list[int] = []
    execute = session._execute

    def wrapper(feeds):
        calls.append(next(iter(feeds.values())).shape[0])
        return execute(feeds)

    session._execute = wrapper  # type: ignore[method-assign]
    return calls


def cnn_samples(rng: np.random.Generator) -> list:
    """11 samples in every accepted form: unbatched arrays, batched dicts, one sample of 2 rows."""
    out: list = []
    for i in range(11):
        if i % 3 == 0:
            out.append(rng.standard_normal((3, 16, 16)).astype(np.float32))  # no batch axis
        elif i == 4:
            out.append({"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)})
        else:
            out.append({"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)})
    return out


def per_sample(session: luodi.Session, samples: list) -> list[dict]:
    want = []
    for s in samples:
        if isinstance(s, np.ndarray):
            want.append({k: v[0] for k, v in session.run({"x": s[np.newaxis]}).items()})
        else:
            want.append(session.run(s))
    return want


@pytest.mark.parametrize("backend", ENGINES)
def test_run_batch_equals_per_sample_runs(backend, cnn_pkg):
    need(backend)
    samples = cnn_samples(np.random.default_rng(1))
    with luodi.Session(cnn_pkg.path, backend=backend) as s:
        want = per_sample(s, samples)
        calls = counted(s)
        got = s.run_batch(samples, max_batch=4)
        assert calls == [4, 4, 4]  # 12 rows (one sample has 2) in chunks of at most 4 rows
        calls.clear()
        padded = s.run_batch(samples[:5], max_batch=4, pad=True)
        assert calls == [4, 4]  # 6 rows: 4, then 2 padded to 4
    assert len(got) == len(samples)
    for g, w, sample in zip(got, want, samples):
        assert g["y"].shape == w["y"].shape == ((5,) if isinstance(sample, np.ndarray) else (sample["x"].shape[0], 5))
        np.testing.assert_allclose(g["y"], w["y"], **TOL)
    for g, w in zip(padded, want[:5]):
        np.testing.assert_allclose(g["y"], w["y"], **TOL)


@pytest.mark.parametrize("backend", ENGINES)
def test_run_batch_groups_by_shape_and_keeps_order(backend, fcn_pkg):
    need(backend)
    rng = np.random.default_rng(2)
    shapes = [(3, 8, 8), (3, 16, 12), (3, 8, 8), (3, 5, 7), (3, 16, 12), (3, 8, 8), (3, 8, 8)]
    samples = [{"x": rng.standard_normal((1, *sh)).astype(np.float32)} for sh in shapes]
    with (
        luodi.Session(fcn_pkg.path, backend=backend) as s,
        luodi.Session(fcn_pkg.path, backend="reference") as ref,
    ):
        calls = counted(s)
        got = s.run_batch(samples, max_batch=3)
        # groups: 8x8 (4 samples -> 3 + 1), 16x12 (2), 5x7 (1)
        assert sorted(calls) == [1, 1, 2, 3] and len(calls) == 4
        for g, sample in zip(got, samples):
            np.testing.assert_allclose(g["y"], ref.run(sample)["y"], **TOL)


@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_models_run_one_by_one_or_padded(tmp_path, batch):
    pkg = luodi.compile(fixed_batch_cnn(batch), tmp_path / "fixed.luodi", targets=["onnxruntime"])
    rng = np.random.default_rng(3)
    samples = [rng.standard_normal((3, 16, 16)).astype(np.float32) for _ in range(10)]
    with luodi.Session(pkg.path, backend="onnxruntime") as s, luodi.Session(small_cnn()) as dynamic:
        calls = counted(s)
        got = s.run_batch(samples, max_batch=8)  # the model's fixed batch wins over max_batch
        assert calls == ([1] * 10 if batch == 1 else [4, 4, 4])  # 10 samples: 4 + 4 + 2 padded to 4
        for g, x in zip(got, samples):
            np.testing.assert_allclose(g["y"], dynamic.run({"x": x[np.newaxis]})["y"][0], **TOL)
        with pytest.raises(luodi.ShapeError, match="fixed batch of 4" if batch == 4 else "expects shape"):
            s.run_batch([np.zeros((batch + 1, 3, 16, 16), np.float32)])


def test_run_batch_on_torch(tmp_path):
    if not installed("torch"):
        pytest.skip("torch not installed: pip install 'luodi[torch]'")
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 5)
    )
    pkg = luodi.export(module.eval(), torch.zeros(1, 3, 8, 8), tmp_path / "t.luodi", targets=["torch"])
    rng = np.random.default_rng(4)
    samples = [rng.standard_normal((3, 8, 8)).astype(np.float32) for _ in range(7)]
    name = pkg.inputs[0].name
    with luodi.Session(pkg.path, backend="torch") as s:
        calls = counted(s)
        got = s.run_batch(samples, max_batch=4)
        assert calls == [4, 3]
        calls.clear()
        s.reshape({name: (4, 3, 8, 8)})
        for g, x in zip(got, samples):
            want = s.run({name: x[np.newaxis]})
            for k in want:
                np.testing.assert_allclose(g[k], want[k][0], **TOL)


@pytest.mark.parametrize("backend", ENGINES)
def test_reshape_then_run(backend, cnn_pkg):
    need(backend)
    x = np.random.default_rng(5).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with luodi.Session(cnn_pkg.path, backend=backend) as s, luodi.Session(cnn_pkg.path, backend="reference") as ref:
        assert s.reshape({"x": (3, 3, 16, 16)}) is s
        np.testing.assert_allclose(s.run({"x": x})["y"], ref.run({"x": x})["y"], **TOL)
        s.reshape({"x": (1, 3, 16, 16)})  # and back: other shapes still run
        np.testing.assert_allclose(s.run({"x": x[:1]})["y"], ref.run({"x": x[:1]})["y"], **TOL)
        for bad in [(3, 3, 16), (0, 3, 16, 16), (-1, 3, 16, 16), (1, 3, 16, 15), ("a", 3, 16, 16)]:
            with pytest.raises(luodi.ShapeError, match="input 'x'"):
                s.reshape({"x": bad})
        with pytest.raises(luodi.UnknownTensorError):
            s.reshape({"nope": (1,)})


def test_run_batch_rejects_bad_calls(cnn_pkg):
    with luodi.Session(cnn_pkg.path, backend="onnxruntime") as s:
        assert s.run_batch([]) == []
        with pytest.raises(luodi.InputError, match="max_batch"):
            s.run_batch([np.zeros((3, 16, 16), np.float32)], max_batch=0)
        with pytest.raises(luodi.DTypeError, match="expects dtype float32"):
            s.run_batch([np.zeros((3, 16, 16), np.float64)])
        with pytest.raises(luodi.ShapeError, match="expects shape"):
            s.run_batch([np.zeros((3, 16, 17), np.float32)])
        with pytest.raises(luodi.MissingInputError, match="sample 1"):
            s.run_batch([{"x": np.zeros((1, 3, 16, 16), np.float32)}, {}])
        with pytest.raises(luodi.UnknownTensorError):
            s.run_batch([{"x": np.zeros((1, 3, 16, 16), np.float32), "z": 1}])
