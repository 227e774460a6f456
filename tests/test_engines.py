"""The same contract on every engine: conformance subset, six verbs, dynamic batch, 8 threads bit-identical.

Backends whose engine is not installed are skipped with the pip line; `make test` installs them all.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import luodi
from conftest import fcn_model, installed
from luodi.verify.conformance import PASS, SUBSET, node_cases, run_case

ENGINES = ["onnxruntime", "reference", "openvino", "ncnn", "mnn"]


def need(backend: str) -> None:
    if backend not in luodi.backend_names():
        pytest.skip(f"no '{backend}' backend in this luodi")
    a = luodi.get_backend(backend).available()
    if not a.ok:
        pytest.skip(f"{backend}: {a.reason} ({a.install})")


@pytest.fixture(scope="module")
def subset_cases():
    return {c.name: c for c in node_cases(SUBSET)}


@pytest.mark.parametrize("case", SUBSET)
@pytest.mark.parametrize("backend", ENGINES)
def test_conformance_subset(backend, case, subset_cases):
    need(backend)
    r = run_case(backend, subset_cases[case])
    assert r.status == PASS, f"{backend} {case}: {r.status}: {r.detail}"


@pytest.fixture(scope="module")
def all_targets_package(tmp_path_factory, cnn_model):
    targets = [b for b in ENGINES if b in luodi.backend_names() and installed(b)]
    out = tmp_path_factory.mktemp("engines") / "cnn.luodi"
    return luodi.compile(cnn_model, out, targets=targets)


@pytest.mark.parametrize("backend", ENGINES)
def test_verified_and_agrees_with_reference(backend, all_targets_package):
    need(backend)
    target = all_targets_package.find_target(backend, "fp32")
    assert target["verification"]["passed"], target["verification"]
    if backend == "reference":  # the yardstick is recorded as such, never compared with itself
        assert target["verification"]["reference"] is True
    else:
        assert target["verification"]["outputs"]["y"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("backend", ENGINES)
def test_dynamic_batch_and_six_verbs(backend, all_targets_package):
    need(backend)
    rng = np.random.default_rng(5)
    with (
        luodi.Session(all_targets_package.path, backend=backend) as s,
        luodi.Session(all_targets_package.path, backend="reference") as ref,
    ):
        for batch in (1, 4, 2):
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            s.prepare({"x": x.shape})
            s.set_tensor("x", x)
            s.forward()
            y = s.get_tensor("y")
            assert y.shape == (batch, 5)
            np.testing.assert_allclose(y, ref.run({"x": x})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ENGINES)
def test_eight_threads_bit_identical(backend, all_targets_package):
    need(backend)
    rng = np.random.default_rng(9)
    inputs = [rng.standard_normal((1 + i % 3, 3, 16, 16)).astype(np.float32) for i in range(8)]
    with luodi.Session(all_targets_package.path, backend=backend) as s:
        expected = [s.run({"x": x})["y"].copy() for x in inputs]
        barrier = threading.Barrier(8)
        bad: list[object] = []

        def work(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(10):
                    if not np.array_equal(s.run({"x": inputs[i]})["y"], expected[i]):
                        bad.append(i)
            except BaseException as exc:  # reported by the assertion below
                bad.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not bad


def test_two_sessions_do_not_share_engine_state(all_targets_package):
    """Two sessions on one package each own their engine: closing one leaves the other working."""
    for backend in [b for b in ENGINES if b in luodi.backend_names() and installed(b)]:
        a = luodi.Session(all_targets_package.path, backend=backend)
        b = luodi.Session(all_targets_package.path, backend=backend)
        x = np.ones((1, 3, 16, 16), np.float32)
        want = a.run({"x": x})["y"]
        a.close()
        np.testing.assert_array_equal(b.run({"x": x})["y"], want)
        b.close()


@pytest.fixture(scope="module")
def fcn_package(tmp_path_factory):
    """A fully convolutional model with dynamic batch, height and width."""
    targets = [b for b in ENGINES if b in luodi.backend_names() and installed(b)]
    return luodi.compile(fcn_model(), tmp_path_factory.mktemp("fcn") / "fcn.luodi", targets=targets)


@pytest.mark.parametrize("backend", ENGINES)
def test_dynamic_spatial_shapes(backend, fcn_package):
    need(backend)
    rng = np.random.default_rng(1)
    with (
        luodi.Session(fcn_package.path, backend=backend) as s,
        luodi.Session(fcn_package.path, backend="reference") as r,
    ):
        for shape in [(1, 3, 8, 8), (2, 3, 16, 12), (1, 3, 5, 7)]:
            x = rng.standard_normal(shape).astype(np.float32)
            s.prepare({"x": shape})
            y = s.run({"x": x})["y"]
            assert y.shape == (shape[0], 4, *shape[2:])
            np.testing.assert_allclose(y, r.run({"x": x})["y"], rtol=1e-4, atol=1e-4)
