"""Triton's model-configuration and statistics extensions, read by the real tritonclient from `luodi serve`."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import luodi
from serve_helpers import Server, running

th = pytest.importorskip("tritonclient.http")


def fixed_int_model() -> onnx.ModelProto:
    """b = a + a on an INT32 tensor of fixed shape [2, 3]: no batch dim, so the server never batches it."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["b"])],
        "fixed_int",
        [helper.make_tensor_value_info("a", TensorProto.INT32, [2, 3])],
        [helper.make_tensor_value_info("b", TensorProto.INT32, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def server(cnn_package: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    (repo / "cnn" / "1").mkdir(parents=True)
    shutil.copy(cnn_package, repo / "cnn" / "1" / "cnn.luodi")
    config = {"max_batch_size": 8, "max_queue_delay_ms": 20, "preferred_batch_sizes": [2, 4], "instances": 2}
    (repo / "cnn" / "config.json").write_text(json.dumps(config))
    luodi.compile(fixed_int_model(), repo / "fixed.luodi", targets=["onnxruntime"], name="fixed")
    with running(repo, "--poll-s", "0", "--timeout-s", "7", log=tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


def _infer(client, batch: int, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer("cnn", [inp])


def test_model_config_gives_the_packages_tensors_and_the_batchers_settings(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    cfg = client.get_model_config("cnn")
    assert cfg["name"] == "cnn" and cfg["platform"] == "luodi_onnxruntime" and cfg["backend"] == "luodi"
    assert cfg["max_batch_size"] == 8  # config.json's, and the batch dim is left out of dims (as Triton does)
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [("x", "TYPE_FP32", [3, 16, 16])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("y", "TYPE_FP32", [5])]
    batching = cfg["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 20_000 and batching["preferred_batch_size"] == [2, 4]
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 7_000_000  # --timeout-s 7
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU" and cfg["instance_group"][0]["count"] == 2
    assert cfg["default_model_filename"] == "cnn/1/cnn.luodi"  # relative: the server's directories stay private
    assert client.get_model_config("cnn", "1") == cfg

    fixed = client.get_model_config("fixed")
    assert fixed["max_batch_size"] == 0 and "dynamic_batching" not in fixed  # no free batch dim: never batched
    assert [(i["name"], i["data_type"], i["dims"]) for i in fixed["input"]] == [("a", "TYPE_INT32", [2, 3])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in fixed["output"]] == [("b", "TYPE_INT32", [2, 3])]

    with pytest.raises(th.InferenceServerException, match="no model 'nope'") as err:
        client.get_model_config("nope")
    assert err.value.status() == "404"
    with pytest.raises(th.InferenceServerException, match="no version 9"):
        client.get_model_config("cnn", "9")
    assert "model_configuration" in client.get_server_metadata()["extensions"]


def _cnn_stats(client) -> dict:
    (stat,) = client.get_inference_statistics("cnn")["model_stats"]
    return stat


def test_statistics_count_exactly_the_requests_rows_and_engine_calls(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    before = _cnn_stats(client)
    t0 = time.time()
    for seed in range(3):  # one after another: each runs alone, as a batch of its own 2 rows
        _infer(client, 2, seed)
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert httpx.post(f"{server.base}/v2/models/cnn/infer", json=bad).status_code == 400
    after = _cnn_stats(client)

    def grew(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return a - b

    assert after["name"] == "cnn" and after["version"] == "1"
    assert grew("inference_count") == 6 and grew("execution_count") == 3
    assert grew("inference_stats", "success", "count") == 3 and grew("inference_stats", "fail", "count") == 1
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert grew("inference_stats", part, "count") == 3
    assert grew("inference_stats", "queue", "ns") >= 3 * 20_000_000 * 0.9  # each waited out the 20 ms delay alone
    infer_ns, success_ns = grew("inference_stats", "compute_infer", "ns"), grew("inference_stats", "success", "ns")
    assert 0 < infer_ns < success_ns
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert t0 * 1000 - 1000 <= after["last_inference"] <= time.time() * 1000 + 1000
    sizes = {b["batch_size"]: b for b in after["batch_stats"]}
    old = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert sizes[2]["compute_infer"]["count"] - old.get(2, 0) == 3
    assert sizes[2]["compute_input"]["count"] == sizes[2]["compute_infer"]["count"]

    # Prometheus counts the same requests
    text = httpx.get(f"{server.base}/metrics").text
    line = next(s for s in text.splitlines() if s.startswith('luodi_requests_total{model="cnn",version="1"}'))
    stats = after["inference_stats"]
    assert float(line.split()[-1]) == stats["success"]["count"] + stats["fail"]["count"]


def test_statistics_of_concurrent_requests_count_the_batches_they_shared(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    before = _cnn_stats(client)
    with ThreadPoolExecutor(8) as pool:  # a client each: tritonclient's HTTP client is not shared across threads
        list(pool.map(lambda seed: _infer(th.InferenceServerClient(server.url), 1, seed), range(8)))
    after = _cnn_stats(client)
    assert after["inference_count"] - before["inference_count"] == 8
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions <= 8
    calls = sum(b["compute_infer"]["count"] for b in after["batch_stats"]) - sum(
        b["compute_infer"]["count"] for b in before["batch_stats"]
    )
    rows = sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) - sum(
        b["batch_size"] * b["compute_infer"]["count"] for b in before["batch_stats"]
    )
    assert calls == executions and rows == 8  # every engine call is in exactly one batch size's row


def test_statistics_of_every_model_and_of_one_version(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    inp = th.InferInput("a", [2, 3], "INT32")
    inp.set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("fixed", [inp]).as_numpy("b"), 2 * a)
    every = {(s["name"], s["version"]): s for s in client.get_inference_statistics()["model_stats"]}
    assert set(every) == {("cnn", "1"), ("fixed", "1")}
    fixed = every[("fixed", "1")]
    assert fixed["inference_count"] == 1 and fixed["execution_count"] == 1  # unbatched: one request is one inference
    assert [b["batch_size"] for b in fixed["batch_stats"]] == [1]
    (one,) = client.get_inference_statistics("fixed", "1")["model_stats"]
    assert one["inference_count"] == 1 and one["name"] == "fixed"
    with pytest.raises(th.InferenceServerException, match="no model 'nope'"):
        client.get_inference_statistics("nope")
    assert "statistics" in client.get_server_metadata()["extensions"]
