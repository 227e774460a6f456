"""Zoo models shipped as ONNX files inside PyPI packages (nudenet, rapidocr-onnxruntime, silero-vad), with pipelines.

The files are found on disk without importing the packages (their imports pull torch, OpenCV...); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from ..source import SourceModel
from .images import _package_dir

PIPELINES_EXTRA = "pip install 'luodi[pipelines]'"

#: nudenet's 18 classes, in the order of the model's outputs (nudenet/nudenet.py).
NUDENET_LABELS = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
]


def _onnx(module: str, rel: str) -> object:
    import onnx

    path = _package_dir(module, PIPELINES_EXTRA) / rel
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed '{module}' package; reinstall it: {PIPELINES_EXTRA}")
    return onnx.load(str(path))


def _rng_images(shape: tuple[int, ...], count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(shape, dtype=np.float32) for _ in range(count)]


def yolov8n_nudenet() -> SourceModel:
    """nudenet's YOLOv8n (320x320, 18 classes) with letterbox, decode, class-wise NMS and boxes in source pixels."""
    model = _onnx("nudenet", "320n.onnx")
    graph = [
        {"op": "decode_image", "in": "input", "out": "image", "mode": "RGB"},
        {"op": "letterbox", "in": "image", "out": ["tensor", "geometry"], "size": 320},
        {"model": "main", "in": {"images": "tensor"}, "out": {"output0": "head"}},
        {"op": "yolo_decode", "in": "head", "out": ["boxes", "scores", "ids"], "conf": 0.25},
        {"op": "nms", "in": ["boxes", "scores", "ids"], "out": ["kept", "kept_scores", "kept_ids"], "iou": 0.45},
        {"op": "unletterbox", "in": ["kept", "geometry"], "out": "source_boxes"},
        {
            "op": "detections",
            "in": ["source_boxes", "kept_scores", "kept_ids"],
            "out": "detections",
            "labels": NUDENET_LABELS,
        },
    ]
    return SourceModel(
        model,
        name="yolov8n-nudenet",
        pipeline={"task": "detection", "input": "images", "output": "output0", "graph": graph, "result": "detections"},
        description="YOLOv8n from nudenet 3.4 (320x320, 18 body-part classes incl. FACE_FEMALE/FACE_MALE)",
        samples=[{"images": x} for x in _rng_images((1, 3, 320, 320))],
    )


def _text_image() -> np.ndarray:
    """A small printed-text picture, so the DB detector's verification input has text in it, not noise."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 96), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(["luodi verifies", "every target 123"]):
        draw.text((12, 12 + 36 * i), line, fill="black", font_size=24)
    x = np.asarray(img)[:, :, ::-1].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def ppocr_v4() -> SourceModel:
    """PP-OCRv4 text detector + PP-OCR mobile v2 orientation classifier + PP-OCRv4 recogniser from
    rapidocr-onnxruntime, as one three-model pipeline giving the text lines of an image as RapidOCR reads them."""
    det = _onnx("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
    cls = _onnx("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    rec = _onnx("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
    meta = {p.key: p.value for p in rec.metadata_props}
    if "character" not in meta:
        raise ModelError("the PP-OCRv4 recogniser has no 'character' dictionary in its metadata; reinstall rapidocr")
    characters = meta["character"].splitlines()
    graph = [
        {"op": "decode_image", "in": "input", "out": "rgb", "mode": "RGB"},
        {"op": "to_bgr", "in": "rgb", "out": "bgr"},
        {"op": "fit_sides", "in": "bgr", "out": ["fitted", "fit"], "max_side": 2000, "min_side": 30},
        {"op": "pad_flat", "in": ["fitted", "fit"], "out": ["page", "geometry"], "min_height": 30, "max_ratio": 8},
        {"op": "db_resize", "in": "page", "out": "det_input", "limit_side": 736},
        {"model": "main", "in": {"x": "det_input"}, "out": {"sigmoid_0.tmp_0": "det_map"}},
        {
            "op": "db_postprocess",
            "in": ["det_map", "page"],
            "out": "quads",
            "thresh": 0.3,
            "box_thresh": 0.5,
            "unclip_ratio": 1.6,
            "use_dilation": True,
        },
        {"op": "reading_order", "in": "quads", "out": "boxes"},
        {"op": "crop_quads", "in": ["page", "boxes"], "out": "crops"},
        {"op": "cls_batch", "in": "crops", "out": "cls_input", "size": [48, 192]},
        {"model": "cls", "in": {"x": "cls_input"}, "out": {"save_infer_model/scale_0.tmp_1": "orientation"}},
        {"op": "fix_orientation", "in": ["crops", "orientation"], "out": "upright", "thresh": 0.9},
        {"op": "rec_batches", "in": "upright", "out": ["rec_inputs", "rec_order"], "size": [48, 320], "batch": 6},
        {"model": "rec", "each": True, "in": {"x": "rec_inputs"}, "out": {"softmax_11.tmp_0": "rec_probs"}},
        {"op": "ctc_decode", "in": ["rec_probs", "rec_order"], "out": "texts", "characters": characters},
        {"op": "text_lines", "in": ["boxes", "texts", "geometry"], "out": "lines", "min_score": 0.5},
    ]
    return SourceModel(
        det,
        name="pp-ocrv4",
        pipeline={"task": "ocr", "graph": graph, "result": "lines"},
        description="PP-OCRv4 det + mobile v2 cls + PP-OCRv4 rec (Chinese/English, 6623 characters), from rapidocr",
        samples=[{"x": _text_image()}],
        models={
            "cls": SourceModel(
                cls,
                name="cls",
                description="PP-OCR mobile v2.0 text orientation (0/180)",
                samples=[{"x": x} for x in _rng_images((2, 3, 48, 192), 1)],
            ),
            "rec": SourceModel(
                rec,
                name="rec",
                description="PP-OCRv4 CTC text recogniser",
                samples=[{"x": x} for x in _rng_images((2, 3, 48, 320), 1)],
            ),
        },
    )


def silero_vad() -> SourceModel:
    """silero-vad 6's ONNX model (stateful, 16 kHz) with framing and silero's speech-segment rules."""
    model = _onnx("silero_vad", "data/silero_vad.onnx")
    state = {"state": "stateN"}
    graph = [
        {"op": "decode_audio", "in": "input", "out": "wav", "sample_rate": 16000},
        {"op": "audio_frames", "in": "wav", "out": "frames", "frame": 512, "context": 64},
        {
            "model": "main",
            "in": {"input": "frames"},
            "out": {"output": "probs"},
            "const": {"sr": 16000},
            "state": state,
            "scan": True,
        },
        {"op": "speech_segments", "in": ["probs", "wav"], "out": "segments", "sample_rate": 16000, "frame": 512},
    ]
    rng = np.random.default_rng(0)
    samples = [
        {
            "input": (rng.standard_normal((1, 576)) * 0.1).astype(np.float32),
            "state": (rng.standard_normal((2, 1, 128)) * 0.1).astype(np.float32),
            "sr": np.array(16000, np.int64),
        }
        for _ in range(2)
    ]
    return SourceModel(
        model,
        name="silero-vad",
        pipeline={
            "task": "vad",
            "input": "input",
            "output": "output",
            "state": state,
            "graph": graph,
            "result": "segments",
        },
        description="silero-vad 6 voice activity detector (16 kHz, 32 ms frames, recurrent state)",
        samples=samples,
    )
