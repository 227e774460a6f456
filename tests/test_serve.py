"""`luodi serve` as a user runs it (a subprocess on 127.0.0.1), talked to by the real tritonclient and plain HTTP."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import luodi
from conftest import small_cnn
from serve_helpers import Server, running

th = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def cnn_repo(tmp_path_factory: pytest.TempPathFactory, cnn_package: Path) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(cnn_package, repo / "cnn.luodi")
    return repo


@pytest.fixture(scope="module")
def server(cnn_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running(cnn_repo, "--max-queue-delay-ms", "20", "--poll-s", "0", log=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(cnn_package: Path):
    with luodi.Session(cnn_package, backend="onnxruntime") as s:
        yield lambda x: s.run({"x": x})["y"]


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def test_tritonclient_health_metadata_and_infer_json_and_binary(server: Server, expected) -> None:
    client = th.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cnn")
    assert client.get_server_metadata()["name"] == "luodi"
    meta = client.get_model_metadata("cnn")
    assert meta["versions"] == ["1"] and meta["platform"] == "luodi_onnxruntime"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 5]}]
    assert client.get_model_metadata("cnn", "1")["name"] == "cnn"
    for binary in (False, True):
        x = _x(3, seed=int(binary))
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("cnn", [inp], outputs=[th.InferRequestedOutput("y", binary_data=binary)], request_id="a1")
        assert result.get_response()["model_version"] == "1" and result.get_response()["id"] == "a1"
        np.testing.assert_allclose(result.as_numpy("y"), expected(x), rtol=1e-5, atol=1e-5)
    result = client.infer("cnn", [inp], model_version="1")  # every output by default
    np.testing.assert_allclose(result.as_numpy("y"), expected(x), rtol=1e-5, atol=1e-5)


def test_user_errors_are_answered_with_the_reason_and_the_server_stays_up(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    with pytest.raises(th.InferenceServerException, match="no model 'nope'"):
        client.get_model_metadata("nope")
    assert not client.is_model_ready("cnn", "7")
    bad = th.InferInput("x", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(th.InferenceServerException, match="'x'"):
        client.infer("cnn", [bad])
    ok = th.InferInput("x", [1, 3, 16, 16], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(th.InferenceServerException, match="timeout"):
        client.infer("cnn", [ok], timeout=1)  # Triton's per-request timeout, in microseconds
    url = f"{server.base}/v2/models/cnn/infer"
    r = httpx.post(url, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    doc = {"inputs": [{"name": "x", "shape": [1, 3, 16, 16], "datatype": "INT64", "data": [0] * 768}]}
    r = httpx.post(url, json=doc)
    assert r.status_code == 400 and "int64" in r.json()["error"] and "float32" in r.json()["error"]
    r = httpx.post(f"{server.base}/v2/models/cnn/versions/9/infer", json=doc)
    assert r.status_code == 404 and "no version 9" in r.json()["error"]
    r = httpx.post(f"{server.base}/v2/models/cnn/predict", content=b"\x89PNG")
    assert r.status_code == 400 and "no pre/post-processing pipeline" in r.json()["error"]
    assert client.is_server_ready()


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server: Server, expected) -> None:
    xs = [_x(1 + i % 3, seed=10 + i) for i in range(24)]

    def one(x: np.ndarray) -> np.ndarray:
        client = th.InferenceServerClient(server.url)
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("cnn", [inp]).as_numpy("y")

    with ThreadPoolExecutor(12) as pool:
        ys = list(pool.map(one, xs))
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(y, expected(x), rtol=1e-5, atol=1e-5)
    text = httpx.get(f"{server.base}/metrics").text
    sizes = _metric(text, 'luodi_batch_size_sum{model="cnn",version="1"}')
    batches = _metric(text, 'luodi_batch_size_count{model="cnn",version="1"}')
    assert batches < sizes, "no batch ever held more than one request"


def _metric(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in /metrics:\n{text}")


def test_metrics_page_status_openapi_and_logs(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    x = _x(2)
    inp = th.InferInput("x", [2, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(x)
    before = _metric(httpx.get(f"{server.base}/metrics").text, 'luodi_requests_total{model="cnn",version="1"}')
    for _ in range(3):
        client.infer("cnn", [inp])
    text = httpx.get(f"{server.base}/metrics").text
    assert _metric(text, 'luodi_requests_total{model="cnn",version="1"}') == before + 3
    for name in ("luodi_queue_seconds", "luodi_compute_seconds", "luodi_request_seconds"):
        assert _metric(text, f'{name}_count{{model="cnn",version="1"}}') >= 3
    assert _metric(text, 'luodi_queue_depth{model="cnn",version="1"}') == 0
    assert _metric(text, 'luodi_request_failures_total{model="cnn",reason="ProtocolError",version="1"}') >= 1

    status = httpx.get(f"{server.base}/luodi/models").json()
    (model,) = status["models"]
    assert model["name"] == "cnn" and model["versions"][0]["state"] == "READY"
    assert model["versions"][0]["requests"] >= 3 and model["versions"][0]["batching"] is True
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "luodi model server" in page.text
    paths = httpx.get(f"{server.base}/openapi.json").json()["paths"]
    assert "/v2/models/{name}/infer" in paths and "/v2/repository/models/{name}/load" in paths
    assert "requestBody" in paths["/v2/models/{name}/infer"]["post"]

    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    infers = [e for e in events if e.get("event") == "infer" and e.get("status") == 200]
    assert infers and {"model", "version", "batch", "queue_ms", "compute_ms", "total_ms"} <= set(infers[-1])


def test_repository_api_unloads_and_loads(server: Server) -> None:
    client = th.InferenceServerClient(server.url)
    assert client.get_model_repository_index() == [{"name": "cnn", "version": "1", "state": "READY", "reason": ""}]
    client.unload_model("cnn")
    assert not client.is_model_ready("cnn")
    x = _x(1)
    inp = th.InferInput("x", [1, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(x)
    r = httpx.post(f"{server.base}/v2/models/cnn/infer", json={"inputs": [inp._get_tensor()]})
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    client.load_model("cnn")
    assert client.is_model_ready("cnn")
    assert client.infer("cnn", [inp]).as_numpy("y").shape == (1, 5)
    with pytest.raises(th.InferenceServerException, match="no model 'ghost'"):
        client.load_model("ghost")


def test_new_version_takes_over_while_requests_keep_flowing(tmp_path: Path) -> None:
    """NAME/<v>/ layout, watched: version 2 appears mid-traffic; every request is answered by v1 or v2, none lost."""
    repo = tmp_path / "repo"
    (repo / "cnn" / "1").mkdir(parents=True)
    luodi.compile(small_cnn(seed=0), repo / "cnn" / "1" / "model.luodi", targets=["onnxruntime"], name="cnn")
    staged = tmp_path / "v2.luodi"
    luodi.compile(small_cnn(seed=1), staged, targets=["onnxruntime"], name="cnn")
    x = _x(1, seed=3)
    with luodi.Session(repo / "cnn" / "1" / "model.luodi") as s1, luodi.Session(staged) as s2:
        want = {"1": s1.run({"x": x})["y"], "2": s2.run({"x": x})["y"]}
    assert not np.allclose(want["1"], want["2"])

    with running(repo, "--poll-s", "0.2", "--max-queue-delay-ms", "5", log=tmp_path / "log") as srv:
        seen: list[tuple[int, str]] = []
        stop = threading.Event()

        def traffic() -> None:
            client = th.InferenceServerClient(srv.url)
            inp = th.InferInput("x", [1, 3, 16, 16], "FP32")
            inp.set_data_from_numpy(x)
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and len(seen) < 5000:
                try:
                    r = client.infer("cnn", [inp])
                except th.InferenceServerException as exc:
                    seen.append((500, str(exc)))
                    continue
                version = r.get_response()["model_version"]
                np.testing.assert_allclose(r.as_numpy("y"), want[version], rtol=1e-5, atol=1e-5)
                seen.append((200, version))

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            (repo / "cnn" / "2").mkdir()
            shutil.copy(staged, repo / "cnn" / "2" / "tmp")
            (repo / "cnn" / "2" / "tmp").rename(repo / "cnn" / "2" / "model.luodi")  # appears whole
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(v == "2" for _, v in seen[-20:]):
                time.sleep(0.05)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        index = th.InferenceServerClient(srv.url).get_model_repository_index()
    assert all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v in seen]
    assert "1" in versions and "2" in versions
    assert "1" not in versions[versions.index("2") + 8 :]  # after the switch (and a few in flight) only v2
    assert {(r["version"], r["state"]) for r in index} == {("1", "UNAVAILABLE"), ("2", "READY")}


def _queued(srv: Server) -> int:
    return httpx.get(f"{srv.base}/luodi/models").json()["models"][0]["versions"][0]["queue_depth"]


@pytest.mark.slow
def test_sigterm_stops_accepting_drains_in_flight_and_exits_zero(cnn_repo: Path, tmp_path: Path, expected) -> None:
    # requests wait up to 3 s for a batch to fill: SIGTERM arrives while they are queued
    srv = Server(cnn_repo, "--max-queue-delay-ms", "3000", "--max-batch-size", "16", log=tmp_path / "log")
    try:
        srv.wait_ready()
        xs = [_x(1, seed=20 + i) for i in range(4)]

        def one(x: np.ndarray) -> httpx.Response:
            doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
            return httpx.post(f"{srv.base}/v2/models/cnn/infer", json=doc, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, x) for x in xs]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _queued(srv) < len(xs):
                time.sleep(0.02)
            assert _queued(srv) == len(xs)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.4)
            with pytest.raises(httpx.ConnectError):  # no longer accepting ...
                httpx.get(f"{srv.base}/v2/health/live", timeout=2)
            assert not any(f.done() for f in futures)  # ... while the queued requests are still to be answered
            responses = [f.result(timeout=30) for f in futures]
        assert srv.proc.wait(timeout=30) == 0
        for x, r in zip(xs, responses):
            assert r.status_code == 200
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(1, 5), expected(x), rtol=1e-5)
        assert time.monotonic() - t0 < 10
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.base}/v2/health/live", timeout=2)
        assert {"shutdown", "stopped"} <= set(srv.events())
    finally:
        srv.stop()


def test_server_keeps_the_cyclic_collector_off_the_request_path() -> None:
    import gc

    from luodi.serve.server import _tune_gc

    before = gc.get_threshold()
    try:
        _tune_gc()
        assert gc.get_freeze_count() > 0  # what start-up loaded is out of every scan
        assert gc.get_threshold()[0] >= 10_000  # not every few requests (default 700 allocations)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_lone_request_runs_on_the_event_loop_and_concurrent_ones_still_batch(
    cnn_repo: Path, expected, caplog: pytest.LogCaptureFixture
) -> None:
    """One request at a time (after the first, which times the model): each runs inline, with nothing handed to a
    worker thread; requests in flight together go through the batcher and share engine calls."""
    import asyncio
    import logging

    from luodi.serve import BatchConfig, ModelRepository, create_app
    from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

    # a bound a loaded test machine cannot miss (the default, 1 ms, is for the model's speed, not the mechanism)
    app = create_app(ModelRepository(cnn_repo, defaults=BatchConfig(max_inline_ms=1000)))
    xs = [_x(1, seed=i) for i in range(12)]
    bodies = [encode_infer_request({"x": x}) for x in xs]

    async def talk() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:

                def post(i: int):
                    body, n = bodies[i]
                    return client.post("/v2/models/cnn/infer", content=body, headers={HEADER_LENGTH: str(n)})

                one_by_one = [await post(i) for i in range(4)]
                together = await asyncio.gather(*(post(i) for i in range(4, 12)))
                return one_by_one + list(together)

    with caplog.at_level(logging.INFO, logger="luodi.serve"):
        answers = asyncio.run(talk())
    for x, r in zip(xs, answers):
        assert r.status_code == 200
        y = decode_infer_response(r.content, r.headers[HEADER_LENGTH])["y"]
        np.testing.assert_allclose(y, expected(x), rtol=1e-5, atol=1e-5)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "infer"]
    assert len(lines) == 12
    inline = [getattr(r, "inline", False) for r in lines]
    assert inline[:4] == [False, True, True, True]  # the first measures the model; then no hand-off
    assert not any(inline[4:])  # eight in flight together: the loop keeps decoding while a worker runs them
    assert max(int(r.headers["luodi-batch-requests"]) for r in answers[4:]) > 1


def test_the_infer_routes_are_plain_asgi_and_fastapis_own_answer_the_same(cnn_repo: Path, expected) -> None:
    """Every infer request goes to luodi's plain ASGI routes (ahead of the rest); FastAPI's infer routes, kept for
    the OpenAPI schema, give the same answers, errors included, through the same code when called."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    from luodi.serve import ModelRepository, create_app
    from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

    app = create_app(ModelRepository(cnn_repo))
    first_two = app.router.routes[:2]
    assert [r.path for r in first_two] == ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"]
    assert not any(isinstance(r, APIRoute) for r in first_two)
    schema_routes = [r for r in app.router.routes if isinstance(r, APIRoute) and r.path.endswith("/infer")]
    assert len(schema_routes) == 2 and "/v2/models/{name}/infer" in app.openapi()["paths"]
    body, n = encode_infer_request({"x": _x(2)})

    async def talk(asgi) -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                headers = {HEADER_LENGTH: str(n)}
                return [
                    await client.post("/v2/models/cnn/infer", content=body, headers=headers),
                    await client.post("/v2/models/cnn/versions/1/infer", content=body, headers=headers),
                    await client.post("/v2/models/cnn/infer", content=b'{"inputs": 3}'),
                    await client.post("/v2/models/nope/infer", content=body, headers=headers),
                ]

    only_fastapis = FastAPI()
    only_fastapis.router.routes[:] = schema_routes
    served, fastapis = asyncio.run(talk(app)), asyncio.run(talk(only_fastapis))
    for r in (served, fastapis):
        for ok in r[:2]:
            assert ok.status_code == 200 and ok.headers["luodi-batch-requests"] == "1"
            y = decode_infer_response(ok.content, ok.headers[HEADER_LENGTH])["y"]
            np.testing.assert_allclose(y, expected(_x(2)), rtol=1e-5, atol=1e-5)
        assert r[2].status_code == 400 and "'inputs' list" in r[2].json()["error"]
        assert r[3].status_code == 404 and "nope" in r[3].json()["error"]
    assert [r.content for r in served] == [r.content for r in fastapis]


def test_luodi_serve_runs_a_lone_request_inline_and_honours_the_requests_in_flight(
    cnn_repo: Path, tmp_path: Path, expected, caplog: pytest.LogCaptureFixture
) -> None:
    """The real server runs requests sent one at a time on the event loop (``"inline": true`` in their log lines);
    the route reads how many requests are in from the scope extension luodi's HTTP protocol sets: with another
    one in flight it hands the request to the batcher."""
    import asyncio

    from luodi.serve import BatchConfig, ModelRepository, create_app
    from luodi.serve.guard import REQUESTS_IN_FLIGHT
    from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

    body, n = encode_infer_request({"x": _x(1)})
    headers = {HEADER_LENGTH: str(n)}
    with running(cnn_repo, "--poll-s", "0", "--max-inline-ms", "1000", log=tmp_path / "server.log") as srv:
        for _ in range(4):
            r = httpx.post(f"{srv.base}/v2/models/cnn/infer", content=body, headers=headers, timeout=30)
            y = decode_infer_response(r.content, r.headers[HEADER_LENGTH])["y"]
            np.testing.assert_allclose(y, expected(_x(1)), rtol=1e-5, atol=1e-5)
        lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    inline = [doc.get("inline", False) for doc in lines if doc.get("event") == "infer"]
    assert inline == [False, True, True, True]  # the first times the model

    in_flight: set = {object()}  # as the protocol's set of request tasks: this request alone, then with another
    app = create_app(ModelRepository(cnn_repo, defaults=BatchConfig(max_inline_ms=1000)))

    async def with_extension(scope, receive, send):
        scope.setdefault("extensions", {})[REQUESTS_IN_FLIGHT] = in_flight
        await app(scope, receive, send)

    async def talk() -> list[str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=with_extension)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                await client.post("/v2/models/cnn/infer", content=body, headers=headers)  # times the model
                alone = await client.post("/v2/models/cnn/infer", content=body, headers=headers)
                in_flight.add(object())
                crowded = await client.post("/v2/models/cnn/infer", content=body, headers=headers)
                return [alone.status_code, crowded.status_code]

    import logging

    with caplog.at_level(logging.INFO, logger="luodi.serve"):
        assert asyncio.run(talk()) == [200, 200]
    inline = [getattr(r, "inline", False) for r in caplog.records if getattr(r, "event", None) == "infer"]
    assert inline == [False, True, False]


def test_an_engine_in_a_worker_process_never_runs_on_the_event_loop(
    cnn_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--isolate: a call may wait for a crashed worker's restart, so even a lone request of a quick model goes through
    the batcher's thread."""
    import asyncio
    import logging

    from luodi.serve import BatchConfig, ModelRepository, create_app
    from luodi.serve.protocol import HEADER_LENGTH, encode_infer_request

    app = create_app(ModelRepository(cnn_repo, defaults=BatchConfig(max_inline_ms=1000, isolate=True)))
    body, n = encode_infer_request({"x": _x(1)})

    async def talk() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                post = lambda: client.post("/v2/models/cnn/infer", content=body, headers={HEADER_LENGTH: str(n)})  # noqa: E731
                return [(await post()).status_code for _ in range(4)]

    with caplog.at_level(logging.INFO, logger="luodi.serve"):
        assert asyncio.run(talk()) == [200] * 4
    lines = [r for r in caplog.records if getattr(r, "event", None) == "infer"]
    assert len(lines) == 4 and not any(getattr(r, "inline", False) for r in lines)


def test_app_options_that_ray_replicas_use_headers_and_a_readiness_gate(cnn_repo: Path, expected) -> None:
    # What `luodi serve --ray` adds to the same app: its node on every answer, ready only once every replica runs.
    import asyncio

    from luodi.serve import ModelRepository, create_app
    from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

    gate = {"open": False}
    app = create_app(ModelRepository(cnn_repo), headers={"luodi-node": "10.0.0.7"}, ready=lambda: gate["open"])
    body, n = encode_infer_request({"x": _x(2)})

    async def talk() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
                r = await client.get("/v2/health/ready")
                assert r.status_code == 503 and r.headers["luodi-node"] == "10.0.0.7"
                gate["open"] = True
                assert (await client.get("/v2/health/ready")).status_code == 200
                r = await client.post("/v2/models/cnn/infer", content=body, headers={HEADER_LENGTH: str(n)})
                assert r.status_code == 200 and r.headers["luodi-batch-requests"] == "1"
                assert r.headers["luodi-node"] == "10.0.0.7"
                y = decode_infer_response(r.content, r.headers[HEADER_LENGTH])["y"]
                np.testing.assert_allclose(y, expected(_x(2)), rtol=1e-5, atol=1e-5)

    asyncio.run(talk())


def test_json_log_lines_carry_each_records_own_time_and_fields() -> None:
    """The formatter keeps the date and time of one second between records: a record of another second (earlier
    or later) gets its own, and the milliseconds and extra fields are always the record's."""
    import logging

    from luodi.serve.metrics import JsonFormatter

    fmt = JsonFormatter()

    def line(created: float, **extra: object) -> dict:
        record = logging.LogRecord("luodi.serve", logging.INFO, __file__, 1, "infer", (), None)
        record.created, record.msecs = created, (created % 1) * 1000
        record.__dict__.update(extra)
        return json.loads(fmt.format(record))

    t = 1_796_000_000.25  # 2026-11-30T00:53:20 UTC
    first, same, later, earlier = line(t, model="cnn"), line(t + 0.5, status=200), line(t + 61), line(t - 3600)
    assert first["ts"] == "2026-11-30T00:53:20.250Z" and first["model"] == "cnn" and first["msg"] == "infer"
    assert same["ts"] == "2026-11-30T00:53:20.750Z" and same["status"] == 200 and "model" not in same
    assert later["ts"] == "2026-11-30T00:54:21.250Z" and earlier["ts"] == "2026-11-29T23:53:20.250Z"
    assert line(t, thing=object())["thing"].startswith("<object")  # anything else as its str()


def test_a_request_line_is_the_line_its_log_record_would_write() -> None:
    """The server writes each request's line without making a log record (it is on the request path), the same
    line the record would give; with a handler of the caller's own on the logger, the record is made as usual."""
    import io
    import logging

    from luodi.serve.metrics import configure_logging, request_line

    luodi_logger, serve_logger = logging.getLogger("luodi"), logging.getLogger("luodi.serve")
    saved = luodi_logger.handlers[:], luodi_logger.level, luodi_logger.propagate
    try:
        configure_logging("info")
        (handler,) = luodi_logger.handlers
        out = io.StringIO()
        handler.setStream(out)
        fields = {"event": "infer", "model": "cnn", "version": "1", "status": 200, "total_ms": 0.5}
        request_line(serve_logger, logging.INFO, "infer", fields)
        serve_logger.log(logging.INFO, "infer", extra=fields)
        request_line(serve_logger, logging.DEBUG, "infer", fields)  # below the level: nothing
        direct, recorded = (json.loads(line) for line in out.getvalue().splitlines())
        # a record factory may add fields of its own to records (Ray's adds _ray_timestamp_ns once imported)
        recorded = {k: v for k, v in recorded.items() if not k.startswith("_")}
        assert len(direct.pop("ts")) == len(recorded.pop("ts")) == len("2026-12-03T16:40:58.340Z")
        assert direct == recorded and direct["model"] == "cnn" and direct["logger"] == "luodi.serve"
        seen: list[logging.LogRecord] = []
        mine = logging.Handler()
        mine.emit = seen.append  # type: ignore[method-assign]
        serve_logger.addHandler(mine)  # a handler of the caller's own: a record, which reaches both
        request_line(serve_logger, logging.INFO, "infer", fields)
        assert [r.model for r in seen] == ["cnn"]  # type: ignore[attr-defined]
        assert json.loads(out.getvalue().splitlines()[-1])["model"] == "cnn" and len(out.getvalue().splitlines()) == 3
    finally:
        serve_logger.handlers[:] = []
        luodi_logger.handlers[:], luodi_logger.level, luodi_logger.propagate = saved


def test_json_bodies_decode_alike_through_orjson_and_the_standard_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson decodes request bodies; what it refuses (NaN, integers beyond 64 bits) the standard library decodes
    as the server always has, and an answer holding NaN keeps the NaN token orjson would turn into null."""
    from luodi.serve import protocol

    assert protocol.orjson is not None  # luodi[serve] installs it
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [0.1, -2.5, 3, 1e-7]}]})
    fast = protocol.decode_infer_request(body.encode())
    monkeypatch.setattr(protocol, "orjson", None)
    slow = protocol.decode_infer_request(body.encode())
    monkeypatch.undo()
    assert np.array_equal(fast.inputs["x"], slow.inputs["x"]) and fast.inputs["x"].dtype == np.float32
    nan = protocol.decode_infer_request(body.replace("3,", "NaN,").encode())  # orjson refuses NaN: json takes it
    assert np.isnan(nan.inputs["x"][1, 0])
    with pytest.raises(luodi.LuodiError, match="not valid JSON"):
        protocol.decode_infer_request(b'{"inputs": [')
    answer, _ = protocol.encode_infer_response("m", "1", {"y": np.array([np.nan, 1.5], np.float32)})
    assert b"NaN" in answer and b"null" not in answer
    finite, _ = protocol.encode_infer_response("m", "1", {"y": np.array([0.25, 1.5], np.float32)})
    assert json.loads(finite)["outputs"][0]["data"] == [0.25, 1.5]
