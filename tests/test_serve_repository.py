"""The model repository on its own (no HTTP): layout, per-model config, fixed-batch models, failed loads, drain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import luodi
from conftest import small_cnn
from luodi.errors import InputError, ModelNotFoundError, ModelUnavailableError
from luodi.serve import BatchConfig, ModelRepository


def fixed_batch_model():
    """y = x + 1 with x of shape [2, 3]: a fixed batch dim, so requests must never be joined."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def repo(tmp_path: Path, cnn_package: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(cnn_package, root / "flat.luodi")
    (root / "cnn" / "1").mkdir(parents=True)
    (root / "cnn" / "3").mkdir()
    shutil.copy(cnn_package, root / "cnn" / "1" / "a.luodi")
    luodi.compile(small_cnn(seed=5), root / "cnn" / "3" / "b.luodi", targets=["onnxruntime"], verify=False)
    (root / "cnn" / "config.json").write_text(json.dumps({"max_batch_size": 4, "preferred_batch_sizes": [2, 4]}))
    luodi.compile(fixed_batch_model(), root / "fixed.luodi", targets=["onnxruntime"], verify=False)
    (root / "notes").mkdir()  # a folder without versions is not a model
    return root


def test_layout_versions_and_config(repo: Path) -> None:
    r = ModelRepository(repo, defaults=BatchConfig(max_batch_size=8))
    try:
        r.start()
        assert sorted((row["name"], row["version"], row["state"]) for row in r.index()) == [
            ("cnn", "1", "UNAVAILABLE"),  # only the newest version is loaded by default
            ("cnn", "3", "READY"),
            ("fixed", "1", "READY"),
            ("flat", "1", "READY"),
        ]
        cnn = r.get("cnn")
        assert cnn.version == "3" and cnn.config.max_batch_size == 4 and cnn.config.preferred_batch_sizes == (2, 4)
        assert r.get("flat").config.max_batch_size == 8
        with pytest.raises(ModelUnavailableError, match="version 1 of model 'cnn' is not loaded"):
            r.get("cnn", "1")
        with pytest.raises(ModelNotFoundError, match="no version 2"):
            r.get("cnn", "2")
        with pytest.raises(ModelNotFoundError, match="no model 'nope'"):
            r.get("nope")
        x = np.zeros((1, 3, 16, 16), np.float32)
        with luodi.Session(repo / "cnn" / "3" / "b.luodi") as s:
            want = s.run({"x": x})["y"]
        with r.acquire("cnn") as mv:
            np.testing.assert_allclose(mv.submit({"x": x}).future.result(10)["y"], want, rtol=1e-6)
            with pytest.raises(luodi.ShapeError, match="'x'"):
                mv.submit({"x": np.zeros((1, 3, 8, 8), np.float32)})
            with pytest.raises(InputError, match="no input"):
                mv.submit({"x": x, "z": x})
    finally:
        r.close()
    r2 = ModelRepository(repo, versions=0)
    try:
        r2.start()
        assert r2.get("cnn", "1").version == "1" and r2.get("cnn").version == "3"
    finally:
        r2.close()


def test_a_model_with_a_fixed_batch_runs_each_request_alone(repo: Path) -> None:
    r = ModelRepository(repo, defaults=BatchConfig(max_batch_size=8, max_queue_delay_ms=200))
    try:
        r.start()
        mv = r.get("fixed")
        assert not mv.batchable and mv.describe()["max_batch_size"] == 1
        xs = [np.full((2, 3), i, np.float32) for i in range(4)]
        jobs = [mv.submit({"x": x}) for x in xs]
        for x, job in zip(xs, jobs):
            np.testing.assert_array_equal(job.future.result(10)["y"], x + 1)
            assert job.batch_size == 1
    finally:
        r.close()


def test_bad_config_and_corrupt_package_are_reported_and_the_old_version_keeps_serving(repo: Path) -> None:
    (repo / "cnn" / "config.json").write_text(json.dumps({"max_batch": 4}))
    (repo / "broken.luodi").write_bytes(b"PK\x03\x04 not really a zip")
    r = ModelRepository(repo)
    try:
        r.start()
        rows = {(row["name"], row["version"]): row for row in r.index()}
        assert rows[("cnn", "3")]["state"] == "UNAVAILABLE" and "max_batch" in rows[("cnn", "3")]["reason"]
        assert "config.json" in rows[("cnn", "3")]["reason"]
        assert rows[("broken", "1")]["state"] == "UNAVAILABLE" and "broken.luodi" in rows[("broken", "1")]["reason"]
        assert r.ready()  # flat and fixed serve: one model's failure does not make the server unready
        assert r.readiness() == {"models_ready": 2, "models_unavailable": 2}
        with pytest.raises(ModelUnavailableError, match="not ready"):
            r.get("broken")
        (repo / "cnn" / "config.json").unlink()
        (repo / "broken.luodi").unlink()
        r.sync()
        assert r.get("cnn").version == "3" and r.ready()

        # a corrupt version 4 appears: it is reported, and version 3 keeps serving
        (repo / "cnn" / "4").mkdir()
        (repo / "cnn" / "4" / "c.luodi").write_bytes(b"garbage")
        r.sync()
        assert r.get("cnn").version == "3"
        assert "version 4" in r.model("cnn").reason
    finally:
        r.close()


def test_unload_drains_what_the_old_version_holds(repo: Path) -> None:
    r = ModelRepository(repo, defaults=BatchConfig(max_batch_size=4, max_queue_delay_ms=400))
    try:
        r.start()
        x = np.ones((1, 3, 16, 16), np.float32)
        with r.acquire("flat") as mv:
            jobs = [mv.submit({"x": x}) for _ in range(3)]  # held in the queue for 0.4 s
            done = threading.Thread(target=r.unload, args=("flat",))
            done.start()
            time.sleep(0.05)
            with pytest.raises(ModelUnavailableError):
                r.get("flat")  # new requests are refused at once ...
        for job in jobs:  # ... while those already queued are answered
            assert job.future.result(10)["y"].shape == (1, 5)
        done.join(10)
        r.load("flat")
        assert r.get("flat").state == "READY"
    finally:
        r.close()


def test_import_luodi_and_the_cli_do_not_import_the_web_stack() -> None:
    code = (
        "import sys, luodi, luodi.serve, luodi.cli.main; "
        "heavy = [m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_package_removed_from_disk_stops_being_served_and_a_new_one_is_picked_up(
    repo: Path, cnn_package: Path
) -> None:
    r = ModelRepository(repo)
    try:
        r.start()
        (repo / "flat.luodi").unlink()
        shutil.copy(cnn_package, repo / "newcomer.luodi")
        r.sync()
        with pytest.raises(ModelUnavailableError, match="no version on disk"):
            r.get("flat")
        assert r.get("newcomer").version == "1"
        assert {row["name"] for row in r.index() if row["state"] == "READY"} == {"cnn", "fixed", "newcomer"}
    finally:
        r.close()


def test_load_through_the_api_switches_to_a_new_version_and_drains_the_old(repo: Path, cnn_package: Path) -> None:
    r = ModelRepository(repo, defaults=BatchConfig(max_batch_size=4, max_queue_delay_ms=300))
    try:
        r.start()  # no watcher: only load() notices the new version
        old = r.get("cnn")
        x = np.ones((1, 3, 16, 16), np.float32)
        with r.acquire("cnn") as held:
            queued = held.submit({"x": x})
            (repo / "cnn" / "5").mkdir()
            shutil.copy(cnn_package, repo / "cnn" / "5" / "m.luodi")
            assert r.get("cnn").version == "3"
            r.load("cnn")
            assert r.get("cnn").version == "5"  # new requests go to version 5 ...
        assert queued.future.result(10)["y"].shape == (1, 5)  # ... the old one answers what it held
        deadline = time.monotonic() + 10
        while old.state != "UNAVAILABLE" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert old.state == "UNAVAILABLE"
    finally:
        r.close()
