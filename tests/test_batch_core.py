"""luodi.batch, the one join/split that Session.run_batch and the server's batcher share, over a real onnxruntime
session: requests of mixed shapes are grouped, joined, run once per group and split back in order, and one
group's failure stays with that group's requests."""

from __future__ import annotations

from concurrent.futures import wait

import numpy as np
import pytest

import luodi
from luodi import batch
from luodi.errors import BackendError, DTypeError, InputError, ShapeError
from luodi.serve import BatchConfig, Batcher
from test_serve_batcher import scale_model


@pytest.fixture(scope="module")
def session():
    with luodi.Session(scale_model(), backend="onnxruntime") as s:
        yield s


def requests(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    shapes = [(1, 3), (2, 5), (3, 3), (1, 5), (2, 3), (4, 5)]
    return [{"x": rng.standard_normal(s).astype(np.float32)} for s in shapes]


def test_mixed_shapes_group_join_run_and_split_back_in_order(session) -> None:
    reqs = requests(np.random.default_rng(0))
    samples = [batch.Sample(i, r, r["x"].shape[0], False) for i, r in enumerate(reqs)]
    chunks = batch.plan(samples, max_batch=8)
    assert sorted(sorted(s.index for s in c) for c in chunks) == [[0, 2, 4], [1, 3, 5]]  # by shape past axis 0
    calls = []

    def run(feeds):
        calls.append(feeds["x"].shape)
        return session.run_validated(feeds)

    got: dict[int, dict[str, np.ndarray]] = {}
    for chunk in chunks:
        joined, rows = batch.join([s.feeds for s in chunk])
        assert rows == [s.rows for s in chunk] and joined["x"].shape[0] == sum(rows)
        for s, out in zip(chunk, batch.split(run(joined), rows), strict=True):
            got[s.index] = out
    assert sorted(calls) == [(6, 3), (7, 5)]  # one engine call per group
    for i, r in enumerate(reqs):
        np.testing.assert_allclose(got[i]["y"], session.run(r)["y"], rtol=1e-6)


def test_join_pads_with_the_last_row_and_split_drops_the_padding(session) -> None:
    a, b = (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), np.float32))
    joined, rows = batch.join([{"x": a}, {"x": b}], pad_to=5)
    assert rows == [2, 1]
    np.testing.assert_array_equal(joined["x"], np.concatenate([a, b, b, b]))
    parts = batch.split(session.run_validated(joined), rows)
    np.testing.assert_allclose(parts[0]["y"], 2 * a)
    np.testing.assert_allclose(parts[1]["y"], 2 * b)
    alone, _ = batch.join([{"x": a}])
    assert alone["x"] is a  # one request, no padding: not copied


def test_split_and_join_name_what_cannot_be_split() -> None:
    with pytest.raises(ShapeError, match="output 's' of shape \\[\\] has no batch dim of 3"):
        batch.split({"s": np.float32(1.0) * np.ones(())}, [1, 2])
    with pytest.raises(InputError, match="same batch size"):
        batch.join([{"x": np.ones((2, 3)), "z": np.ones((3, 3))}])


def test_run_validated_skips_the_checks_that_run_keeps(session) -> None:
    x64 = np.ones((1, 3), np.float64)
    with pytest.raises(DTypeError):
        session.run({"x": x64})
    with pytest.raises(BackendError):  # not checked again: the engine itself refuses it
        session.run_validated({"x": x64})


def test_a_failed_group_fails_only_its_own_requests(session) -> None:
    # Requests that skipped the server's check reach the engine: the float64 group fails in onnxruntime, while
    # the float32 requests queued with it are answered.
    batcher = Batcher(session.run_validated, BatchConfig(max_batch_size=8, max_queue_delay_ms=50))
    try:
        good = [{"x": np.full((1, 3), i, np.float32)} for i in range(3)]
        bad = [{"x": np.ones((1, 3), np.float64)} for _ in range(2)]
        jobs = [batcher.submit(f) for f in (good[0], bad[0], good[1], bad[1], good[2])]
        wait([j.future for j in jobs], timeout=30)
    finally:
        batcher.close()
    for value, job in enumerate((jobs[0], jobs[2], jobs[4])):
        np.testing.assert_allclose(job.future.result()["y"], np.full((1, 3), 2 * value, np.float32))
        assert job.requests == 3  # the float32 group shared one engine call
    for job in (jobs[1], jobs[3]):
        assert isinstance(job.future.exception(), BackendError)
