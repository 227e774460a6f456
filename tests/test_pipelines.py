"""The zoo's detection, OCR and VAD pipelines end to end, compared with the reference libraries' own results.

Each package is compiled once per test session; the references (nudenet, RapidOCR, silero-vad) run for real.
"""

from __future__ import annotations

import importlib.util
import json
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import luodi
from conftest import installed
from luodi.cli.main import cli
from luodi.pipeline.ops import Detection, SpeechSegment, TextLine
from luodi.zoo.images import skimage_picture


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


@pytest.fixture(scope="session")
def det_package(tmp_path_factory) -> Path:
    targets = ["onnxruntime"] + (["openvino"] if installed("openvino") else [])
    out = tmp_path_factory.mktemp("pipes") / "det.luodi"
    luodi.compile("zoo:yolov8n-nudenet", out, targets=targets)
    return out


@pytest.fixture(scope="session")
def ocr_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipes") / "ocr.luodi"
    luodi.compile("zoo:pp-ocrv4", out, targets=["onnxruntime"])
    return out


@pytest.fixture(scope="session")
def vad_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipes") / "vad.luodi"
    luodi.compile("zoo:silero-vad", out, targets=["onnxruntime"])
    return out


# -- detection ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_detection_finds_the_face_nudenet_finds(det_package):
    from nudenet import NudeDetector

    astronaut = str(skimage_picture("astronaut"))
    ref = [d for d in NudeDetector().detect(astronaut) if d["class"] == "FACE_FEMALE"]
    assert ref, "nudenet's own detector should find the astronaut's face"
    x, y, w, h = ref[0]["box"]
    with luodi.Session(det_package, backend="onnxruntime") as s:
        found = s.predict(astronaut)
    faces = [d for d in found if d.label == "FACE_FEMALE"]
    assert len(faces) == 1 and isinstance(faces[0], Detection)
    assert _iou(faces[0].box, (x, y, x + w, y + h)) >= 0.9
    assert faces[0].score > 0.5


@pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed")
def test_detection_pipeline_is_engine_independent(det_package):
    astronaut = str(skimage_picture("astronaut"))
    with luodi.Session(det_package, backend="onnxruntime") as a, luodi.Session(det_package, backend="openvino") as b:
        ort, ov = a.predict(astronaut), b.predict(astronaut)
    assert [d.label for d in ov] == [d.label for d in ort]
    for d, e in zip(ort, ov):
        assert _iou(d.box, e.box) > 0.99 and abs(d.score - e.score) < 1e-3


def test_detection_cli_draws_boxes(det_package, tmp_path):
    vis = tmp_path / "out.png"
    result = CliRunner().invoke(
        cli, ["predict", str(det_package), str(skimage_picture("astronaut")), "--save-vis", str(vis)]
    )
    assert result.exit_code == 0, result.output
    assert "FACE_FEMALE" in result.output
    from PIL import Image

    drawn = np.asarray(Image.open(vis).convert("RGB")).astype(int)
    source = np.asarray(Image.open(skimage_picture("astronaut")).convert("RGB")).astype(int)
    assert drawn.shape == source.shape and (np.abs(drawn - source).sum(axis=2) > 0).sum() > 300


def test_detection_of_a_batch_and_bad_input(det_package):
    pics = [str(skimage_picture("astronaut")), str(skimage_picture("coffee"))]
    with luodi.Session(det_package, backend="onnxruntime") as s:
        both = s.predict(pics)
        assert len(both) == 2 and any(d.label == "FACE_FEMALE" for d in both[0])
        assert not any(d.label.startswith("FACE") for d in both[1])
        with pytest.raises(luodi.PipelineError, match="cannot make an image of a int"):
            s.predict(3)


# -- OCR -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ocr_reads_what_rapidocr_reads(ocr_package):
    from rapidocr_onnxruntime import RapidOCR

    page = str(skimage_picture("page"))
    ref, _ = RapidOCR()(page)
    with luodi.Session(ocr_package, backend="onnxruntime") as s:
        lines = s.predict(page)
    assert all(isinstance(t, TextLine) for t in lines)
    assert [t.text for t in lines] == [r[1] for r in ref]
    assert len(ref) == 5 and "Region-based" in ref[0][1]
    np.testing.assert_allclose([t.score for t in lines], [r[2] for r in ref], atol=1e-4)
    np.testing.assert_allclose([t.box for t in lines], [r[0] for r in ref], atol=1.0)


def test_ocr_is_one_package_of_three_models(ocr_package):
    pkg = luodi.Package(ocr_package)
    assert pkg.model_names == ["cls", "rec"]
    for name in pkg.model_names:
        (target,) = pkg.submodel(name).targets
        assert target["verification"]["passed"], (name, target["verification"])
    with luodi.Session(ocr_package, backend="onnxruntime") as s:
        rec = s.model("rec")
        assert rec.backend == "onnxruntime" and rec.outputs[0].name == "softmax_11.tmp_0"
        out = rec.run({"x": np.zeros((1, 3, 48, 320), np.float32)})
        assert out["softmax_11.tmp_0"].shape[-1] == 6625
        with pytest.raises(luodi.LuodiError, match="no model 'det2'"):
            s.model("det2")
        assert s.predict(np.full((64, 256, 3), 255, np.uint8)) == []  # a blank picture has no text


def test_encrypted_ocr_package_unlocks_all_three_models_and_reads_the_same(ocr_package, tmp_path):
    pytest.importorskip("cryptography", reason="needs luodi[security]")
    from luodi.package import crypto

    locked = crypto.encrypt_package(ocr_package, tmp_path / "ocr-enc.luodi", passphrase="ocr pass")
    plain = luodi.Package(ocr_package)
    members = [n for n in plain.manifest["files"] if n != "manifest.json"]
    assert any(n.startswith("models/") for n in members), members  # the cls and rec models are members too
    with zipfile.ZipFile(locked) as zf:
        for name in members:
            data, stored = plain.read(name), zf.read(name)  # the stored member, inflated: ciphertext
            assert data[len(data) // 2 : len(data) // 2 + 32] not in stored, f"{name} is stored in the clear"
    page = str(skimage_picture("page"))
    with luodi.Session(ocr_package, backend="onnxruntime") as s:
        want = s.predict(page)
    with pytest.raises(luodi.LuodiError, match="passphrase"):
        luodi.Session(locked, backend="onnxruntime")
    with luodi.Session(locked, backend="onnxruntime", passphrase="ocr pass") as s:
        assert [s.model(n).backend for n in ("cls", "rec")] == ["onnxruntime", "onnxruntime"]  # further models too
        got = s.predict(page)
    assert [t.text for t in got] == [t.text for t in want] and len(got) == 5
    np.testing.assert_allclose([t.score for t in got], [t.score for t in want], atol=1e-6)


# -- VAD ---------------------------------------------------------------------------------------------
def _speech() -> np.ndarray:
    """Real speech: pyannote.audio's sample.wav (an AMI meeting excerpt, 30 s, 16 kHz), with 2 s of silence spliced
    in at 12 s so the waveform has one more pause of known place."""
    spec = importlib.util.find_spec("pyannote")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pyannote-audio (its sample.wav) is not installed: pip install --no-deps pyannote-audio")
    path = Path(next(iter(spec.submodule_search_locations))) / "audio" / "sample" / "sample.wav"
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return np.concatenate([pcm[: 12 * 16000], np.zeros(2 * 16000, np.float32), pcm[12 * 16000 :]])


def test_vad_matches_silero_get_speech_timestamps(vad_package):
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    wav = _speech()
    ref = get_speech_timestamps(torch.from_numpy(wav), load_silero_vad(onnx=True))
    with luodi.Session(vad_package, backend="onnxruntime") as s:
        segs = s.predict(wav)
    assert all(isinstance(x, SpeechSegment) for x in segs)
    assert [(x.start, x.end) for x in segs] == [(r["start"], r["end"]) for r in ref]
    assert len(segs) >= 3
    # the spliced-in silence (12 s .. 14 s) separates two segments
    assert any(x.end <= 12.2 * 16000 and y.start >= 13.8 * 16000 for x, y in zip(segs, segs[1:]))


def test_streams_keep_their_own_state(vad_package):
    wav = _speech()[16000 * 7 : 16000 * 9]
    frames = luodi.pipeline.ops.audio.AudioFrames()(wav)
    sr = np.array(16000, np.int64)
    with luodi.Session(vad_package, backend="onnxruntime") as s:
        alone = [s.stream().run({"input": frames[:1], "sr": sr})["output"]]  # a fresh stream per call: no memory
        one = s.stream("a")
        whole = [one.run({"input": f[None], "sr": sr})["output"] for f in frames]
        a, b = s.stream("mic-1"), s.stream("mic-2")
        assert s.stream("mic-1") is a
        mixed_a, mixed_b = [], []
        for f in frames:  # two streams interleaved on one session
            mixed_a.append(a.run({"input": f[None], "sr": sr})["output"])
            mixed_b.append(b.run({"input": f[None] * 0, "sr": sr})["output"])
        np.testing.assert_array_equal(np.concatenate(mixed_a), np.concatenate(whole))
        assert float(np.concatenate(whole).max()) > 0.5 > float(np.concatenate(mixed_b).max())
        np.testing.assert_array_equal(alone[0], whole[0])
        a.reset()
        assert not a.state["state"].any()
        with pytest.raises(luodi.PipelineError, match="stream's state"):
            a.run({"input": frames[:1], "sr": sr, "state": np.zeros((2, 1, 128), np.float32)})
        with pytest.raises(luodi.PipelineError, match="not an input"):
            s.stream(state={"h": "stateN"})


# -- the spec is checked at compile time ---------------------------------------------------------------
def _det_source(graph_edit):
    from luodi.zoo import yolov8n_nudenet

    src = yolov8n_nudenet()
    spec = json.loads(json.dumps(src.pipeline))
    graph_edit(spec)
    src.pipeline = spec
    return src


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["graph"].pop(1), "reads 'tensor', which no earlier step makes"),
        (lambda s: s["graph"][2]["in"].update(images="nope"), "reads 'nope'"),
        (lambda s: s["graph"][2].update(model="cls"), "has no model 'cls'"),
        (lambda s: s["graph"][2].update({"in": {"image": "tensor"}}), r"feeds \['image'\], which are not inputs"),
        (lambda s: s["graph"][2].update({"out": {"logits": "head"}}), "not outputs of the model"),
        (lambda s: s["graph"][3].update(op="yolo_decoder"), "unknown pipeline op 'yolo_decoder'"),
        (lambda s: s["graph"][1].update(out="image"), "makes 'image' again"),
        (lambda s: s.update(result="boxes2"), "'result' 'boxes2' is not made"),
    ],
)
def test_bad_graph_is_refused_before_anything_is_written(tmp_path, edit, message):
    out = tmp_path / "bad.luodi"
    with pytest.raises(luodi.PipelineError, match=message):
        luodi.compile(_det_source(edit), out, targets=["onnxruntime"], verify=False)
    assert not out.exists()
