"""The KServe v2 codec and the dynamic batcher on their own (no HTTP), over real onnxruntime sessions."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import luodi
from luodi.errors import InputError, OverloadedError, ProtocolError, RequestTimeoutError
from luodi.serve import BatchConfig, Batcher
from luodi.serve.protocol import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)


def scale_model() -> onnx.ModelProto:
    """y = 2 * x with x of shape [batch, n]: both dims free, so requests of different n must never share a batch."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def scale_session():
    with luodi.Session(scale_model(), backend="onnxruntime") as s:
        yield s


# -- protocol -------------------------------------------------------------------------------------
def test_binary_request_round_trips_and_json_agrees() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ids = np.array([[1, -2]], dtype=np.int64)
    body, n = encode_infer_request({"x": x, "ids": ids}, binary=True, request_id="r1")
    assert n is not None and n < len(body)
    req = decode_infer_request(body, str(n))
    assert req.id == "r1" and req.binary_output
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    body_json, n_json = encode_infer_request({"x": x}, binary=False)
    assert n_json is None
    np.testing.assert_array_equal(decode_infer_request(body_json).inputs["x"], x)

    out, hl = encode_infer_response("m", "3", {"y": x * 2}, req)
    assert hl is not None
    header = json.loads(out[:hl])
    assert header["model_name"] == "m" and header["model_version"] == "3" and header["id"] == "r1"
    np.testing.assert_array_equal(decode_infer_response(out, hl)["y"], x * 2)
    out_json, hl_json = encode_infer_response("m", "3", {"y": x * 2})
    assert hl_json is None and json.loads(out_json)["outputs"][0]["data"] == (x * 2).ravel().tolist()


@pytest.mark.parametrize(
    ("doc", "binary", "words"),
    [
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}, b"", "needs 2"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}, b"", "FP99"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", "integers from 0"),
        ({"inputs": []}, b"", "no 'inputs'"),
        (
            {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
            b"1234",
            "does not fit",
        ),
        (
            {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
            b"1234",
            "needs 8",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
            b"junk",
            "no input's binary_data_size",
        ),
    ],
)
def test_malformed_requests_name_what_is_wrong(doc: dict, binary: bytes, words: str) -> None:
    header = json.dumps(doc).encode()
    with pytest.raises(ProtocolError, match=words):
        decode_infer_request(header + binary, len(header) if binary else None)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_infer_request(b"{nope")


# -- batcher --------------------------------------------------------------------------------------
def test_requests_of_different_shapes_never_share_a_batch(scale_session) -> None:
    batches: list[int] = []
    batcher = Batcher(
        scale_session.run,
        BatchConfig(max_batch_size=16, max_queue_delay_ms=200),
        on_batch=lambda size, *_: batches.append(size),
    )
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((1 + i % 2, 3 + i % 3)).astype(np.float32) for i in range(12)]
    try:
        jobs = [batcher.submit({"x": x}) for x in feeds]
        for x, job in zip(feeds, jobs):
            y = job.future.result(timeout=10)["y"]
            assert y.shape == x.shape  # a request never gets rows of another shape's batch
            np.testing.assert_array_equal(y, 2 * x)
    finally:
        batcher.close()
    # 12 requests in 3 width groups (n = 3, 4, 5): joined per group, never across groups
    assert len(batches) == 3 and sum(batches) == sum(x.shape[0] for x in feeds)
    assert {j.batch_size for j in jobs} == set(batches)


def test_max_batch_size_and_preferred_sizes_bound_each_batch(scale_session) -> None:
    batches: list[int] = []
    config = BatchConfig(max_batch_size=8, max_queue_delay_ms=300, preferred_batch_sizes=(4,))
    batcher = Batcher(scale_session.run, config, on_batch=lambda size, *_: batches.append(size))
    try:
        xs = [np.full((1, 2), i, np.float32) for i in range(10)]
        jobs = [batcher.submit({"x": x}) for x in xs]
        for x, job in zip(xs, jobs):
            np.testing.assert_array_equal(job.future.result(timeout=10)["y"], 2 * x)
        with pytest.raises(InputError, match="larger than the model's max_batch_size 8"):
            batcher.submit({"x": np.zeros((9, 2), np.float32)})
    finally:
        batcher.close()
    assert batches[:2] == [4, 4] and sum(batches) == 10 and max(batches) <= 8


def test_default_batching_runs_a_lone_request_at_once_and_joins_what_queued_meanwhile(scale_session) -> None:
    """Delay 0 (the default): an idle worker does not wait for partners; requests that arrive while the engine
    runs form the next batch together."""
    gate, started = threading.Event(), threading.Event()
    batches: list[int] = []

    def held(feeds):  # the real engine, held on its first call so that the others queue behind it
        if not started.is_set():
            started.set()
            gate.wait(10)
        return scale_session.run(feeds)

    assert BatchConfig().max_queue_delay_ms == 0
    batcher = Batcher(held, BatchConfig(max_batch_size=16), on_batch=lambda size, *_: batches.append(size))
    try:
        first = batcher.submit({"x": np.zeros((1, 2), np.float32)})
        assert started.wait(5), "a lone request waited for partners"
        xs = [np.full((1, 2), i, np.float32) for i in range(1, 9)]
        jobs = [batcher.submit({"x": x}) for x in xs]
        gate.set()
        first.future.result(timeout=10)
        for x, job in zip(xs, jobs):
            np.testing.assert_array_equal(job.future.result(timeout=10)["y"], 2 * x)
    finally:
        gate.set()
        batcher.close()
    assert batches == [1, 8]


def test_a_quick_models_lone_request_runs_in_the_callers_thread_and_others_still_queue(scale_session) -> None:
    """run_inline: once the model's lone runs are known to be quick, a request that finds nothing queued or running
    runs in the calling thread (no hand-off); while a batch runs, or for a slow model, or with max_inline_ms 0,
    it declines and the request queues as before."""
    threads: list[str] = []
    gate = threading.Event()
    gate.set()

    def run(feeds):  # the real engine, noting the thread it ran on; held while the gate is shut
        threads.append(threading.current_thread().name)
        gate.wait(10)
        return scale_session.run(feeds)

    x = np.ones((1, 2), np.float32)
    batcher = Batcher(run, BatchConfig(max_batch_size=8, max_inline_ms=50), name="m")
    try:
        assert not batcher.inline_ok({"x": x}) and batcher.run_inline({"x": x}) is None  # no lone run measured yet
        batcher.submit({"x": x}).future.result(timeout=10)
        assert threads == ["luodi-batcher-m-0"] and batcher.inline_ok({"x": x})
        wide = {"x": np.ones((1, 4096), np.float32)}  # shapes never run alone: not inline on a guess
        assert not batcher.inline_ok(wide) and batcher.run_inline(wide) is None
        job = batcher.run_inline({"x": x})
        assert job is not None and job.future.done() and threads[-1] == threading.current_thread().name
        np.testing.assert_array_equal(job.future.result()["y"], 2 * x)
        assert job.batch_size == 1 and job.requests == 1 and job.compute_s > 0
        gate.clear()  # a batch runs on the worker: the next request must queue behind it, not run beside it
        held = batcher.submit({"x": x})
        while batcher.busy == 0:
            time.sleep(0.001)
        assert batcher.run_inline({"x": x}) is None
        gate.set()
        held.future.result(timeout=10)
    finally:
        gate.set()
        batcher.close()
    slow = Batcher(run, BatchConfig(max_batch_size=8, max_inline_ms=0))
    try:
        slow.submit({"x": x}).future.result(timeout=10)
        assert slow.run_inline({"x": x}) is None  # 0: never inline
    finally:
        slow.close()


def test_full_queue_is_refused_at_once_and_expired_requests_time_out(scale_session) -> None:
    gate = threading.Event()

    def slow(feeds):  # the real engine, held until the test lets it go so that the queue fills
        gate.wait(10)
        return scale_session.run(feeds)

    batcher = Batcher(slow, BatchConfig(max_batch_size=1, max_queue_size=3, timeout_s=0.2))
    try:
        first = batcher.submit({"x": np.ones((1, 2), np.float32)})
        time.sleep(0.1)  # the worker holds `first`; the next three fill the queue
        queued = [batcher.submit({"x": np.ones((1, 2), np.float32)}) for _ in range(3)]
        t0 = time.perf_counter()
        with pytest.raises(OverloadedError, match="queue is full") as info:
            batcher.submit({"x": np.ones((1, 2), np.float32)})
        assert time.perf_counter() - t0 < 0.05 and info.value.retry_after_s >= 1
        time.sleep(0.3)  # past the 0.2 s timeout while queued
        gate.set()
        np.testing.assert_array_equal(first.future.result(timeout=10)["y"], np.full((1, 2), 2, np.float32))
        for job in queued:
            with pytest.raises(RequestTimeoutError, match="past its timeout"):
                job.future.result(timeout=10)
    finally:
        gate.set()
        batcher.close()


def test_close_drains_what_is_queued(scale_session) -> None:
    batcher = Batcher(scale_session.run, BatchConfig(max_batch_size=4, max_queue_delay_ms=500))
    jobs = [batcher.submit({"x": np.full((1, 2), i, np.float32)}) for i in range(6)]
    batcher.close(drain=True)
    for i, job in enumerate(jobs):
        np.testing.assert_array_equal(job.future.result(timeout=0)["y"], np.full((1, 2), 2 * i, np.float32))


def test_bad_settings_are_named() -> None:
    with pytest.raises(InputError, match="preferred_batch_sizes"):
        BatchConfig(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(InputError, match="max_queue_size"):
        BatchConfig(max_queue_size=0)
    with pytest.raises(InputError, match="max_inline_ms"):
        BatchConfig(max_inline_ms=-1)
