"""`luodi serve --isolate`: kill -9 one model's worker under load; only its in-flight requests fail (503).

Two models are served, each engine in its own worker process; the killed worker's pid comes from the server's
/luodi/models. A real server subprocess, real onnxruntime engines, real HTTP clients.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import luodi
from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request
from serve_helpers import running

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need Linux memfd")


def conv_stack(seed: int, layers: int = 4, width: int = 32) -> onnx.ModelProto:
    """Conv layers on [batch, 3, 96, 96] then a classifier: about 20 ms at batch 1 and 0.6 s at batch 32 here."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(layers):
        w = (rng.standard_normal((width, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, cin = f"r{i}", width
    inits.append(numpy_helper.from_array(rng.standard_normal((10, width)).astype(np.float32), "fw"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 96, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("isolate-repo")
    for name, seed in (("a", 0), ("b", 1)):
        luodi.compile(conv_stack(seed), root / f"{name}.luodi", targets=["onnxruntime"], name=name)
    (root / "c" / "1").mkdir(parents=True)  # its config.json turns isolation off for this model only
    shutil.copy(root / "a.luodi", root / "c" / "1" / "model.luodi")
    (root / "c" / "config.json").write_text(json.dumps({"isolate": False}))
    return root


def _workers(base: str) -> dict[str, dict | None]:
    models = httpx.get(f"{base}/luodi/models", timeout=10).json()["models"]
    return {m["name"]: m["versions"][0]["worker"] for m in models}


@pytest.mark.slow
def test_kill_9_one_models_worker_only_its_in_flight_requests_fail(repo: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    big = np.repeat(x, 32, axis=0)  # a request that runs alone for a while: certainly in flight at the kill
    want = {n: luodi.Session(repo / f"{n}.luodi").run({"x": x})["y"] for n in ("a", "b")}
    body, length = encode_infer_request({"x": x})
    big_body, big_length = encode_infer_request({"x": big})
    with running(repo, "--isolate", "--poll-s", "0", log=tmp_path / "serve.log") as srv:
        workers = _workers(srv.base)
        assert workers["a"]["pid"] and workers["b"]["pid"] and workers["a"]["pid"] != workers["b"]["pid"]
        assert workers["c"] is None  # config.json {"isolate": false} wins over --isolate
        victim = workers["a"]["pid"]
        results: dict[str, list[tuple[float, int, str]]] = {"a": [], "b": []}
        stop = threading.Event()

        def client(name: str) -> None:
            with httpx.Client(base_url=srv.base, timeout=30) as c:
                while not stop.is_set():
                    r = c.post(f"/v2/models/{name}/infer", content=body, headers={HEADER_LENGTH: str(length)})
                    if r.status_code == 200:
                        got = decode_infer_response(r.content, int(r.headers[HEADER_LENGTH]))["y"]
                        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5)
                    results[name].append((time.monotonic(), r.status_code, r.text if r.status_code != 200 else ""))

        threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "a", "a", "b", "b")]
        big_answer: list[httpx.Response] = []

        def big_request() -> None:
            headers = {HEADER_LENGTH: str(big_length)}
            big_answer.append(
                httpx.post(f"{srv.base}/v2/models/a/infer", content=big_body, headers=headers, timeout=60)
            )

        victims: list[int] = []

        for t in threads:
            t.start()
        try:
            time.sleep(1.5)
            killed_at = 0.0
            for _ in range(3):  # a kill that misses the big request's run (a hiccup of this busy host) is redone
                sender = threading.Thread(target=big_request)
                sender.start()
                _wait_until_mapped(victim, big.nbytes, big_answer)  # the worker reads the big request: it runs it now
                killed_at = killed_at or time.monotonic()
                os.kill(victim, signal.SIGKILL)
                victims.append(victim)
                sender.join(60)
                if big_answer[-1].status_code == 503:
                    break
                deadline = time.monotonic() + 60
                while victim in victims and time.monotonic() < deadline:  # the restarted worker's pid
                    victim = _workers(srv.base)["a"]["pid"] or victim
                    time.sleep(0.05)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the restarted worker has answered a few requests
                if sum(s == 200 and t > killed_at + 0.5 for t, s, _ in results["a"]) >= 5:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        a_codes = [s for _, s, _ in results["a"]]
        b_codes = [s for _, s, _ in results["b"]]
        assert set(b_codes) == {200}, f"the other model failed: {sorted(set(b_codes))}"
        assert sum(t > killed_at for t, _, _ in results["b"]) >= 5, "the other model did not keep answering"
        assert big_answer[-1].status_code == 503, big_answer[-1].text  # it was running when the worker died
        failed = [(t, s, text) for t, s, text in results["a"] if s != 200]
        failed.append((killed_at, 503, big_answer[-1].text))
        for t, status, text in failed:
            assert status == 503, (status, text)
            error = json.loads(text)["error"]  # the KServe error body
            assert "SIGKILL" in error and any(f"pid {v})" in error for v in victims), error
            assert t >= killed_at
        assert len(failed) <= len(victims) * (1 + 3), "more than the requests in flight failed"
        assert a_codes[-1] == 200, "model a did not answer again after the restart"
        after = _workers(srv.base)
        assert after["a"]["restarts"] == len(victims)
        assert after["a"]["exits"] == ["was killed by SIGKILL"] * len(victims)
        assert after["a"]["pid"] not in (None, *victims)
        assert after["b"] == {**workers["b"], "restarts": 0}
        metrics = httpx.get(f"{srv.base}/metrics", timeout=10).text
        assert f'luodi_worker_restarts{{model="a",version="1"}} {len(victims)}.0' in metrics
        assert 'luodi_worker_restarts{model="b",version="1"} 0.0' in metrics
        assert not any(Path(f"/proc/{v}").exists() for v in victims), "a killed worker was not reaped"
        pids = [after["a"]["pid"], after["b"]["pid"]]
    for pid in pids:  # the server's death (kill -9 here) ends its workers too: they see their sockets close
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pid), f"worker {pid} outlived the server"


def _wait_until_mapped(pid: int, nbytes: int, answered: list, timeout_s: float = 30.0) -> None:
    """Until worker ``pid`` maps shared memory of ``nbytes`` or more: it reads a request that big, then runs it.

    A fresh worker's tensor regions start small and grow only to fit what it is sent, so the first mapping this big
    is the big request reaching the engine. (A kill timed from the send would land while the request still waits in
    the server's queue on a busy host, and that request then runs on the restarted worker.)
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not answered:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            return
        for line in maps:
            if "memfd:luodi-worker" in line:
                start, end = (int(v, 16) for v in line.split()[0].split("-"))
                if end - start >= nbytes:
                    return
        time.sleep(0.001)


def _running(pid: int) -> bool:
    """Alive (an orphan's zombie, left to whoever reaps orphans here, has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_config_json_isolate_must_be_true_or_false() -> None:
    from luodi.serve.batcher import BatchConfig

    with pytest.raises(luodi.InputError, match="isolate 'yes' is not true or false"):
        BatchConfig(isolate="yes")
