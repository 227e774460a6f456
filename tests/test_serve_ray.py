"""Scale-out on Ray: `luodi serve --ray` on one node and on a two-node loopback cluster, and `luodi batch --ray`.

Every Ray process is started here as a subprocess in its own process group and stopped by that id (never
`ray stop`, which would stop other users' Ray on a shared machine). Answers are checked against Session.run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import luodi
from luodi.serve import Access, ModelRepository, create_app
from luodi.serve.batcher import BatchConfig
from luodi.serve.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request

pytest.importorskip("ray.serve", reason="needs ray[serve]: pip install 'luodi[ray]'")

from conftest import small_cnn  # noqa: E402
from luodi.serve.ray import Scaling  # noqa: E402
from serve_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

# Ray kills its workers when the machine is short of memory; on a shared test machine that is mostly others' memory.
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    # Serve's proxy prefers replicas on its own node; the cluster tests want the load spread over both nodes.
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    "PYTHONUNBUFFERED": "1",
    # A node's raylet gets 30 s to register with the GCS by default; a loaded 2-core machine has missed that.
    "RAY_raylet_start_wait_time_s": "120",
}


# -- helpers ---------------------------------------------------------------------------------------------------
class Proc:
    """A subprocess in its own process group, logged to a file, stopped by its pid and then its group id."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env or ENV, start_new_session=True
        )
        self.pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Whatever it left behind: Ray puts each worker in a process group of its own, but all stay in the
        # session that start_new_session gave the leader (its pid), so that id finds every one of them.
        for pid in session_members(self.pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


def session_members(sid: int) -> list[int]:
    """The pids of the live processes in session ``sid`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # after "pid (comm)": state ppid pgrp session
                pids.append(int(stat.parent.name))
    return pids


def wait_ready(base: str, proc: Proc, timeout_s: float = 120.0, nodes: tuple[Proc, ...] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"`luodi serve --ray` exited with {proc.proc.returncode}:\n{proc.log()}")
        for node in nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"`ray start` exited with {node.proc.returncode}:\n{node.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"Ray Serve was not ready within {timeout_s} s:\n{proc.log()}")


def serve_cmd(repo: Path, host: str, port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "luodi",
        "serve",
        "--ray",
        "-r",
        str(repo),
        "--host",
        host,
        "--port",
        str(port),
        *args,
    ]


def infer(client: httpx.Client, base: str, x: np.ndarray) -> tuple[np.ndarray, httpx.Headers]:
    body, n = encode_infer_request({"x": x})
    r = client.post(f"{base}/v2/models/cnn/infer", content=body, headers={HEADER_LENGTH: str(n)}, timeout=30)
    assert r.status_code == 200, r.text
    return decode_infer_response(r.content, r.headers[HEADER_LENGTH])["y"], r.headers


@pytest.fixture(scope="module")
def cnn_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ray-repo")
    luodi.compile(small_cnn(), repo / "cnn.luodi", targets=["onnxruntime"], name="small-cnn")
    return repo


def reference(repo: Path, xs: list[np.ndarray]) -> list[np.ndarray]:
    with luodi.Session(repo / "cnn.luodi", backend="onnxruntime") as s:
        return [s.run({"x": x})["y"] for x in xs]


# -- no Ray needed -----------------------------------------------------------------------------------------------
def test_scaling_options_set_max_ongoing_requests_and_autoscaling() -> None:
    opts = Scaling().options(BatchConfig(max_batch_size=16))
    assert opts["max_ongoing_requests"] == 32  # twice the batch: a full batch waits while one computes
    assert opts["num_replicas"] == 1 and opts["ray_actor_options"] == {"num_cpus": 0.5}
    auto = Scaling(autoscale=(1, 4), resources={"node_a": 1}).options(BatchConfig(max_batch_size=8))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert auto["ray_actor_options"]["resources"] == {"node_a": 1}
    with pytest.raises(luodi.LuodiError, match="max_ongoing_requests 5 < max_batch_size 32"):
        Scaling(max_ongoing_requests=5).options(BatchConfig(max_batch_size=32))
    with pytest.raises(luodi.LuodiError, match="autoscale"):
        Scaling(autoscale=(3, 1)).options(BatchConfig())


# -- one node ------------------------------------------------------------------------------------------------------
def test_serve_ray_one_node_answers_and_batches(cnn_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ("--max-batch-size", "8", "--max-queue-delay-ms", "50", "--num-cpus", "0.5", "-b", "onnxruntime")
    server = Proc(serve_cmd(cnn_repo, "127.0.0.1", port, *args), tmp_path / "serve.log")
    try:
        wait_ready(base, server)
        meta = httpx.get(f"{base}/v2/models/cnn", timeout=10).json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((1 + i % 3, 3, 16, 16)).astype(np.float32) for i in range(24)]
        want = reference(cnn_repo, xs)
        with httpx.Client() as client, ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda x: infer(client, base, x), xs))
        for (got, _), w in zip(answers, want, strict=True):
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
        joined = [int(h["luodi-batch-requests"]) for _, h in answers]
        assert max(joined) > 1, f"the replica's batcher never joined requests: {joined}"
        assert len({h["luodi-node"] for _, h in answers}) == 1  # one replica, on its node
        # Ray serves luodi serve's own app: the same routes (model control aside: read-only), and routes the
        # hand-written router of old lacked answer through Ray's proxy too
        local = create_app(ModelRepository(cnn_repo), access=Access(read_only=True)).openapi()["paths"]
        served = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
        assert {p: sorted(m) for p, m in served.items()} == {p: sorted(m) for p, m in local.items()}
        assert "/v2/repository/index" not in served and "/v2/models/{name}/infer" in served
        assert httpx.get(f"{base}/v2", timeout=10).json()["extensions"]
        status = httpx.get(f"{base}/luodi/models", timeout=10).json()
        assert status["models"][0]["name"] == "cnn" and status["models"][0]["versions"][0]["requests"] >= 24
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "luodi_requests_total{" in metrics and 'model="cnn"' in metrics
        # bad input: a 400 that says what is wrong, and the replica keeps answering
        bad = httpx.post(
            f"{base}/v2/models/cnn/infer",
            json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            timeout=10,
        )
        assert bad.status_code == 400 and "expects shape" in bad.json()["error"]
        assert httpx.get(f"{base}/v2/models/cnn/versions/7", timeout=10).status_code == 404
        # the router shares luodi serve's checks: malformed requests are 400s, never 500s
        npy_4tb = (
            b"\x93NUMPY\x01\x00v\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (1024, 1024, 1024, 1024), }"
        )
        npy_4tb += b" " * (127 - len(npy_4tb)) + b"\n"
        for path, body in [
            ("/v2/models/cnn/predict?k=abc", b"x"),
            ("/v2/models/cnn/predict", npy_4tb),
            ("/v2/models/cnn/infer", b'{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "data": []}]}'),
            ("/v2/models/cnn/infer", b'{"inputs": [], "parameters": [1]}'),
        ]:
            r = httpx.post(base + path, content=body, timeout=10)
            assert r.status_code == 400 and r.json()["error"], (path, r.status_code, r.text)
        got, _ = infer(httpx.Client(), base, xs[0])
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()


# -- luodi batch --ray -----------------------------------------------------------------------------------------------
def test_batch_ray_writes_one_line_per_image_as_session_predict(effnet_package: Path, tmp_path: Path) -> None:
    from luodi.zoo.images import skimage_picture

    folder = tmp_path / "images"
    folder.mkdir()
    names = ["chelsea", "coffee", "astronaut", "rocket", "coins"]
    for name in names:
        src = skimage_picture(name)
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("not an input")  # not an image suffix: skipped
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "luodi", "batch", "--ray", str(effnet_package), str(folder), "-o", str(out)]
    run = subprocess.run(
        [*cmd, "--actors", "1", "--batch-size", "2", "-k", "3", "-b", "onnxruntime"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    assert run.returncode == 1, run.stderr[-4000:]  # one file failed, and the exit status says so
    assert "1 file(s) failed" in run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    files = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    assert [row["file"] for row in lines] == files
    by_file = {row["file"]: row for row in lines}
    assert by_file["broken.png"]["result"] is None and by_file["broken.png"]["error"]
    with luodi.Session(effnet_package, backend="onnxruntime") as s:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".txt" or path.name == "broken.png":
                continue
            row = by_file[path.name]
            assert row["error"] is None
            want = s.predict(str(path), k=3)
            assert [p["index"] for p in row["result"]] == [p.index for p in want]
            np.testing.assert_allclose([p["score"] for p in row["result"]], [p.score for p in want], rtol=1e-4)
            assert [p["label"] for p in row["result"]] == [p.label for p in want]


def test_batch_ray_refuses_a_folder_without_images(effnet_package: Path, tmp_path: Path) -> None:
    from luodi.serve.ray import batch_predict

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(luodi.LuodiError, match="holds no file ending in"):
        batch_predict(effnet_package, tmp_path, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


# -- two nodes on loopback ----------------------------------------------------------------------------------------
HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def ray_start(ip: str, log: Path, *, head_port: int, head: bool) -> Proc:
    """`ray start --block` for one node: 1 CPU and one "luodi_slot", so that one replica fits on each node."""
    ray = str(Path(sys.executable).parent / "ray")
    where = ["--head", f"--port={head_port}", f"--ray-client-server-port={free_port()}"] if head else []
    where += ["--include-dashboard=false", f"--dashboard-port={free_port()}"] if head else []
    where += [f"--address={HEAD}:{head_port}"] if not head else []
    ports = [  # every port of ours chosen free, so that nobody else's Ray on this machine collides with it
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    cmd = [ray, "start", *where, f"--node-ip-address={ip}", "--num-cpus=1", '--resources={"luodi_slot": 1}']
    cmd += ["--disable-usage-stats", "--block", *ports]
    return Proc(cmd, log)


def wait_started(node: Proc, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in node.log():
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`ray start --head` did not start (exit {node.proc.poll()}):\n{node.log()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cnn_repo: Path) -> Iterator[dict]:
    """A head (127.0.0.2) and a worker (127.0.0.3) node, and `luodi serve --ray` with a cnn replica on each."""
    logs = tmp_path_factory.mktemp("ray-cluster")
    head_port, http_port = free_port(), free_port()
    procs: dict[str, Proc] = {}
    try:
        procs["head"] = ray_start(HEAD, logs / "head.log", head_port=head_port, head=True)
        wait_started(procs["head"])  # the worker joins the head's GCS, which must be up first
        procs["worker"] = ray_start(WORKER, logs / "worker.log", head_port=head_port, head=False)
        args = ("--ray-address", f"{HEAD}:{head_port}", "--replicas", "2", "--num-cpus", "0")
        args += ("--ray-resources", '{"luodi_slot": 1}', "--max-batch-size", "4", "-b", "onnxruntime")
        procs["serve"] = Proc(serve_cmd(cnn_repo, HEAD, http_port, *args), logs / "serve.log")
        base = f"http://{HEAD}:{http_port}"
        try:
            wait_ready(base, procs["serve"], timeout_s=120, nodes=(procs["head"], procs["worker"]))
        except AssertionError as exc:
            head, worker = procs["head"].log(), procs["worker"].log()
            raise AssertionError(f"{exc}\n--- head:\n{head}\n--- worker:\n{worker}") from None
        yield {"base": base, "procs": procs}
    finally:
        # The driver first, then the nodes, each by its pid and then its session. A node drains for up to
        # 30 s on SIGTERM; the cluster is thrown away here, so 5 s will do before the rest is killed.
        for name in ("serve", "worker", "head"):
            if name in procs:
                procs[name].stop(grace_s=30 if name == "serve" else 5)


def test_two_node_cluster_serves_a_replica_on_each_node(cluster: dict, cnn_repo: Path) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(40)]
    want = reference(cnn_repo, xs)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: infer(client, cluster["base"], x), xs))
    for (got, _), w in zip(answers, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
    nodes = {h["luodi-node"] for _, h in answers}
    assert nodes == {HEAD, WORKER}, f"answers came from {nodes}, not from a replica on each node"


def test_requests_keep_being_answered_when_the_worker_node_stops(cluster: dict, cnn_repo: Path) -> None:
    base = cluster["base"]
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (want,) = reference(cnn_repo, [x])
    log: list[tuple[float, bool, str]] = []  # (time, answered correctly, node or error)
    stop = threading.Event()
    t_start = time.monotonic()

    def client() -> None:
        with httpx.Client() as c:
            while not stop.is_set() and time.monotonic() - t_start < 60 and len(log) < 5000:
                try:
                    got, headers = infer(c, base, x)
                    ok = bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))
                    log.append((time.monotonic(), ok, headers["luodi-node"]))
                except (AssertionError, httpx.HTTPError) as exc:
                    log.append((time.monotonic(), False, str(exc)[:200]))
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        assert any(node == WORKER for _, ok, node in log if ok), f"no answer from the worker before it stopped: {log}"
        killed = time.monotonic()
        worker = cluster["procs"]["worker"]
        worker.stop()  # SIGTERM to `ray start --block`, then every process left in its session
        gone = time.monotonic()
        assert not session_members(worker.pgid), "processes of the stopped worker node are still running"
        time.sleep(7)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    after = [(t, ok, node) for t, ok, node in log if t > killed]
    answered = [node for t, ok, node in after if ok]
    assert len(answered) >= 20, f"only {len(answered)} answers after the worker was told to stop: {after[-10:]}"
    # Once the node is gone (and Serve has had 3 s to notice), every request is answered, by the head's replica.
    late = [(ok, node) for t, ok, node in after if t > gone + 3]
    assert len(late) >= 10, f"only {len(late)} requests after the worker node was gone: {after[-10:]}"
    assert all(ok and node == HEAD for ok, node in late), [r for r in late if not r[0] or r[1] != HEAD][:5]
    wrong = [r for r in log if not r[1] and r[2] in (HEAD, WORKER)]
    assert not wrong, f"wrong answers: {wrong[:5]}"
