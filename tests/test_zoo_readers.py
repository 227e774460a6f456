"""The zoo's detection (free height/width) and VAD (stateful, a fixed sample rate) packages, read back as users do:
served (warmed up at their representative shapes, with the pipeline's constants) and checked by `luodi verify`.

Before, the server warmed them up with every free dim at 1 and stayed 503, and `luodi verify` ended in a traceback.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import luodi
from conftest import installed
from serve_helpers import running

ZOO_DATA = Path(luodi.__file__).parent / "zoo" / "data"


def luodi_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=600)


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇┴┬╈┼]", " ", text).split())


@pytest.fixture(scope="module")
def det_package(tmp_path_factory) -> Path:
    targets = ["onnxruntime"] + (["openvino"] if installed("openvino") else [])
    out = tmp_path_factory.mktemp("zoo") / "det.luodi"
    luodi.compile("zoo:yolov8n-nudenet", out, targets=targets)
    return out


@pytest.fixture(scope="module")
def vad_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "vad.luodi"
    luodi.compile("zoo:silero-vad", out, targets=["onnxruntime"], tune=True)
    return out


def test_vad_is_tuned_at_its_shapes_and_sample_rate(vad_package):
    """--tune times the targets on generated inputs: at the primary shapes, with 'sr' at 16000 (any other rate
    makes silero-vad's graph fail, and the target was left untimed)."""
    timing = luodi.Package(vad_package).find_target("onnxruntime")["timing"]
    assert timing["median_ms"] > 0 and timing["device"] == "cpu"


def _infer(base: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {"float32": "FP32", "int64": "INT64"}
    body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": types[str(a.dtype)], "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ]
    }
    r = httpx.post(f"{base}/v2/models/{model}/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


@pytest.mark.slow
def test_detection_and_vad_are_served(tmp_path, det_package, vad_package):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(det_package, repo / "det.luodi")
    shutil.copy(vad_package, repo / "vad.luodi")
    image = np.random.default_rng(0).random((1, 3, 320, 256), np.float32)  # another size than the warm-up's
    frame = {
        "input": (np.random.default_rng(1).standard_normal((1, 576)) * 0.1).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    with running(repo, "--poll-s", "0", log=tmp_path / "server.log") as server:  # waits for /v2/health/ready 200
        index = httpx.post(f"{server.base}/v2/repository/index", timeout=10).json()
        assert {m["name"]: m["state"] for m in index} == {"det": "READY", "vad": "READY"}
        det = _infer(server.base, "det", {"images": image})
        vad = _infer(server.base, "vad", frame)
    with luodi.Session(det_package, backend="onnxruntime") as s:
        np.testing.assert_allclose(det["output0"], s.run({"images": image})["output0"], rtol=1e-4, atol=1e-3)
    with luodi.Session(vad_package, backend="onnxruntime") as s:
        np.testing.assert_allclose(vad["output"], s.run(frame)["output"], rtol=1e-5, atol=1e-6)
    assert det["output0"].shape == (1, 22, 1680)


@pytest.mark.slow
def test_verify_detection_without_and_with_data(tmp_path, det_package):
    r = luodi_cli("verify", str(det_package))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "random input(s) at the representative shapes" in flat(r.stdout)
    assert "onnxruntime:fp32 output0" in flat(r.stdout) and "FAIL" not in r.stdout
    images = tmp_path / "images"
    images.mkdir()
    for picture in ZOO_DATA.glob("*.jpg"):  # real photographs, through the package's letterbox pipeline
        shutil.copy(picture, images)
    r = luodi_cli("verify", str(det_package), "--data", str(images))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "on 2 sample(s)" in flat(r.stdout) and "pass" in r.stdout and "FAIL" not in r.stdout


def _speech() -> np.ndarray:
    """2 s of real speech when pyannote's sample is installed, else a voiced-like synthetic signal: the point here is
    that frames as the pipeline cuts them, at its rate, verify."""
    import importlib.util
    import wave

    spec = importlib.util.find_spec("pyannote")
    found = spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "audio" / "sample" / "sample.wav" if found else None
    if path is not None and path.exists():
        with wave.open(str(path)) as w:
            wav = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        wav = wav[16000 * 2 : 16000 * 4]
    else:
        t = np.arange(16000 * 2) / 16000
        wav = (0.3 * np.sin(2 * np.pi * 140 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return wav


def _write_wav(path: Path, wav: np.ndarray) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


@pytest.mark.slow
def test_verify_vad_without_and_with_data(tmp_path, vad_package):
    r = luodi_cli("verify", str(vad_package))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "onnxruntime:fp32 output" in flat(r.stdout) and "FAIL" not in r.stdout
    from luodi.pipeline.ops.audio import AudioFrames
    from luodi.verify.report import data_feeds

    wav = _speech()
    speech = _write_wav(tmp_path / "speech.wav", wav)
    feeds = data_feeds(luodi.Package(vad_package), str(speech))
    assert len(feeds) == -(-len(wav) // 512) and all(int(f["sr"]) == 16000 for f in feeds)
    assert not feeds[0]["state"].any() and np.abs(feeds[-1]["state"]).max() > 0  # the state the stream carries
    r = luodi_cli("verify", str(vad_package), "--data", str(speech), "--limit", "6")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr  # frames with the stream's state
    assert "on 6 sample(s)" in flat(r.stdout) and "FAIL" not in r.stdout
    frames = AudioFrames()(wav)[::8]
    data = tmp_path / "frames.npz"  # model-ready tensors, one sample per row; 'sr' comes from the pipeline
    np.savez(data, input=frames[:, None, :], state=np.zeros((len(frames), 2, 1, 128), np.float32))
    r = luodi_cli("verify", str(vad_package), "--data", str(data), "--limit", "6")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "on 6 sample(s)" in flat(r.stdout) and "FAIL" not in r.stdout
    np.savez(
        tmp_path / "bad.npz", input=frames[:, None, :].astype(np.float64), state=np.zeros((len(frames), 2, 1, 128))
    )
    r = luodi_cli("verify", str(vad_package), "--data", str(tmp_path / "bad.npz"))
    assert r.returncode == 2 and "expects dtype float32, got float64" in r.stderr and "Traceback" not in r.stderr
