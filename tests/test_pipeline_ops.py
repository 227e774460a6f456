"""Unit tests of the pipeline ops (detection, OCR, audio): each op alone on small known inputs."""

from __future__ import annotations

import numpy as np
import pytest

import luodi
from luodi.pipeline.ops import audio, detection, ocr
from luodi.pipeline.spec import build_op


def test_letterbox_fits_centres_and_fills():
    img = np.full((100, 200, 3), 255, np.uint8)
    tensor, geo = detection.Letterbox(size=64)(img)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    assert geo["scale"] == pytest.approx(0.32) and (geo["left"], geo["top"]) == (0, 16)
    np.testing.assert_allclose(tensor[0, :, :16], 114 / 255, rtol=1e-6)  # grey band above
    np.testing.assert_allclose(tensor[0, :, 16:48], 1.0, rtol=1e-6)  # the (white) picture
    np.testing.assert_allclose(tensor[0, :, 48:], 114 / 255, rtol=1e-6)


def test_letterbox_rejects_non_images():
    with pytest.raises(luodi.PipelineError, match="RGB image"):
        detection.Letterbox(size=64)(np.zeros((4, 4), np.float32))


def test_yolo_decode_keeps_confident_anchors_as_corners():
    head = np.zeros((1, 4 + 2, 3), np.float32)
    head[0, :4, 0] = [50, 40, 20, 10]  # cx, cy, w, h
    head[0, 5, 0] = 0.9  # class 1
    head[0, :4, 1] = [10, 10, 4, 4]
    head[0, 4, 1] = 0.1  # below conf
    head[0, 4, 2] = 0.3
    boxes, scores, ids = detection.YoloDecode(conf=0.25)(head)
    np.testing.assert_allclose(boxes, [[40, 35, 60, 45], [0, 0, 0, 0]])
    np.testing.assert_allclose(scores, [0.9, 0.3])
    assert ids.tolist() == [1, 0]


def test_nms_is_class_wise():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    ids = np.array([0, 0, 1, 0])
    kept, kept_scores, kept_ids = detection.Nms(iou=0.5)(boxes, scores, ids)
    # box 1 overlaps box 0 of its own class: suppressed; box 2 overlaps box 0 but is another class: kept
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept_ids.tolist() == [0, 1, 0]


def test_unletterbox_inverts_letterbox_and_clips():
    geo = {"scale": 0.5, "left": 0, "top": 10, "width": 100, "height": 60}
    out = detection.Unletterbox()(np.array([[10, 20, 40, 35], [-5, 0, 60, 100]], np.float32), geo)
    np.testing.assert_allclose(out, [[20, 20, 80, 50], [0, 0, 100, 60]])


def test_detections_names_and_orders():
    got = detection.Detections(labels=["cat", "dog"])(
        np.array([[0, 0, 1, 1], [2, 2, 3, 3]], np.float32), np.array([0.2, 0.9]), np.array([0, 1])
    )
    assert [(d.label, round(d.score, 1)) for d in got] == [("dog", 0.9), ("cat", 0.2)]


def test_to_bgr_from_grey_and_rgb():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert ocr.ToBgr()(grey).shape == (2, 3, 3)
    rgb = np.zeros((1, 1, 3), np.uint8)
    rgb[0, 0] = [1, 2, 3]
    assert ocr.ToBgr()(rgb)[0, 0].tolist() == [3, 2, 1]


def test_db_resize_makes_multiples_of_32_normalised():
    x = ocr.DbResize(limit_side=64)(np.full((50, 100, 3), 255, np.uint8))
    assert x.shape == (1, 3, 64, 128)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


def test_db_postprocess_finds_a_text_blob():
    prob = np.zeros((1, 1, 64, 128), np.float32)
    prob[0, 0, 20:40, 10:110] = 0.95
    page = np.zeros((32, 64, 3), np.uint8)  # half the map's size: boxes come back scaled
    boxes = ocr.DbPostprocess()(prob, page)
    assert boxes.shape == (1, 4, 2)
    x0, y0 = boxes[0].min(axis=0)
    x1, y1 = boxes[0].max(axis=0)
    # the blob is 10..110 x 20..40 in map pixels; unclipped (grown) then halved
    assert x0 <= 5 and y0 <= 10 and x1 >= 54 and y1 >= 19 and x1 <= 63 and y1 <= 31


def test_reading_order_top_to_bottom_then_left_to_right():
    def quad(x, y):
        return [[x, y], [x + 10, y], [x + 10, y + 5], [x, y + 5]]

    boxes = np.array([quad(50, 30), quad(40, 2), quad(0, 5)], np.float32)
    ordered = ocr.ReadingOrder()(boxes)
    assert [tuple(b[0]) for b in ordered] == [(0, 5), (40, 2), (50, 30)]


def test_crop_quads_and_turning_tall_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[10:20, 10:50] = 255
    wide = np.array([[[10, 10], [50, 10], [50, 20], [10, 20]]], np.float32)
    tall = np.array([[[10, 0], [20, 0], [20, 30], [10, 30]]], np.float32)
    (crop,) = ocr.CropQuads()(img, wide)
    assert crop.shape == (10, 40, 3) and crop.mean() > 200
    (turned,) = ocr.CropQuads()(img, tall)
    assert turned.shape == (10, 30, 3)


def test_cls_batch_pads_to_fixed_width_and_fix_orientation_turns():
    crops = [np.full((24, 48, 3), 255, np.uint8), np.full((10, 400, 3), 255, np.uint8)]
    x = ocr.ClsBatch(size=[48, 192])(crops)
    assert x.shape == (2, 3, 48, 192)
    assert np.all(x[0, :, :, 96:] == 0) and np.all(x[0, :, :, :96] == 1)  # 2:1 crop -> 96 px, then zero padding
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    out = ocr.FixOrientation(thresh=0.9)([a, a], np.array([[0.05, 0.95], [0.2, 0.8]], np.float32))
    assert np.array_equal(out[0], a[::-1, ::-1]) and out[1] is a


def test_rec_batches_sorted_by_ratio_and_padded_per_batch():
    crops = [np.zeros((10, w, 3), np.uint8) for w in (300, 20, 100)]
    batches, order = ocr.RecBatches(size=[48, 320], batch=2)(crops)
    assert order.tolist() == [1, 2, 0]
    assert [b.shape for b in batches] == [(2, 3, 48, 480), (1, 3, 48, 1440)]


def test_ctc_decode_merges_repeats_and_drops_blanks():
    chars = ["a", "b"]
    # classes: 0 blank, 1 'a', 2 'b', 3 ' '
    seq = [1, 1, 0, 1, 2, 3, 2]
    probs = np.zeros((1, len(seq), 4), np.float32)
    probs[0, np.arange(len(seq)), seq] = 0.5
    probs[0, 0, 1] = 0.9
    (text, score), (empty, zero) = ocr.CtcDecode(chars)([probs, np.zeros((1, 3, 4), np.float32)], np.array([0, 1]))
    assert text == "aab b" and score == pytest.approx((0.9 + 0.5 * 4) / 5)
    assert (empty, zero) == ("", 0.0)


def test_text_lines_filters_and_maps_back():
    boxes = np.array([[[0, 20], [10, 20], [10, 30], [0, 30]]] * 2, np.float32)
    geo = {"width": 100, "height": 100, "ratio_w": 2.0, "ratio_h": 2.0, "top": 10}
    lines = ocr.TextLines(min_score=0.5)(boxes, [("hi", 0.9), ("lo", 0.4)], geo)
    assert [t.text for t in lines] == ["hi"]
    assert lines[0].box == [[0, 20], [20, 20], [20, 40], [0, 40]]


def test_decode_audio_reads_wav_and_decimates(tmp_path):
    import wave

    path = tmp_path / "tone.wav"
    pcm = (np.sin(np.arange(3200) / 5) * 16000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(32000)
        w.writeframes(np.repeat(pcm, 2).tobytes())  # both channels the same
    wav = audio.DecodeAudio(sample_rate=16000)(str(path))
    assert wav.dtype == np.float32 and wav.shape == (1600,)
    np.testing.assert_allclose(wav, pcm[::2] / 32768, atol=1e-6)
    with pytest.raises(luodi.PipelineError, match="resampled"):
        audio.DecodeAudio(sample_rate=16000)(_wav_bytes(tmp_path, 22050))


def _wav_bytes(tmp_path, rate):
    import wave

    path = tmp_path / "other.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(100, np.int16).tobytes())
    return path.read_bytes()


def test_audio_frames_prefix_context_and_pad():
    wav = np.arange(1, 11, dtype=np.float32)
    frames = audio.AudioFrames(frame=4, context=2)(wav)
    assert frames.tolist() == [[0, 0, 1, 2, 3, 4], [3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 0, 0]]


def test_speech_segments_hysteresis_and_padding():
    probs = np.array([0.1, 0.9, 0.9, 0.4, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    segs = audio.SpeechSegments(sample_rate=1000, frame=100, min_speech_ms=150, min_silence_ms=200, pad_ms=30)(
        probs, np.zeros(1000, np.float32)
    )
    # 0.4 is above the 0.35 exit threshold: one segment from frame 1 to the silence at frame 5
    assert [(s.start, s.end) for s in segs] == [(70, 530)]
    assert segs[0].start_s == pytest.approx(0.07)


def test_unknown_op_and_bad_params_are_pipeline_errors():
    with pytest.raises(luodi.PipelineError, match="unknown pipeline op 'nope'"):
        build_op({"op": "nope"})
    with pytest.raises(luodi.PipelineError, match="bad parameters"):
        build_op({"op": "letterbox", "sise": 3})
