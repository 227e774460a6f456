"""Per pipeline, where the time goes (pre-processing / models / post-processing), and OCR end to end against RapidOCR.

What it measures
----------------
1. For each zoo pipeline (classification: EfficientNet-Lite0 on chelsea.png; detection: nudenet's YOLOv8n on
   astronaut.png; OCR: PP-OCRv4 det+cls+rec on page.png; VAD: silero-vad on pyannote.audio's 30 s sample.wav),
   ``Session.predict`` on the onnxruntime target, split by the pipeline's own timer
   (``session.pipeline.last_timings``: op steps by their stage, model calls as "model").
2. OCR end to end: luodi's ``Session.predict(page.png)`` against ``rapidocr_onnxruntime.RapidOCR()(page.png)``
   on the same image and the same engine (onnxruntime, CPU, default threads), alternating call by call.
   Target: luodi median / rapidocr median <= 1.0.

Packages are compiled once into a temporary folder (``verify=False``: this times running, not compiling).
Every side is warmed up twice; medians over ``--runs`` calls. The script reports, it does not assert.

Run::

    .venv/bin/python benchmarks/pipelines.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/pipelines.py --runs 5   # quicker
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import luodi
from luodi.zoo.images import skimage_picture


def _speech() -> str:
    spec = importlib.util.find_spec("pyannote")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs pyannote-audio's sample.wav: pip install --no-deps pyannote-audio")
    return str(Path(next(iter(spec.submodule_search_locations))) / "audio" / "sample" / "sample.wav")


def _stages(session: luodi.Session, raw: object, runs: int) -> dict[str, float]:
    for _ in range(2):
        session.predict(raw)
    seen: dict[str, list[float]] = {"pre": [], "model": [], "post": [], "total": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        session.predict(raw)
        seen["total"].append(time.perf_counter() - t0)
        for k, v in session.pipeline.last_timings.items():
            seen[k].append(v)
    return {k: statistics.median(v) * 1e3 for k, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="timed calls per pipeline (after 2 warm-up calls)")
    args = ap.parse_args()
    cases = [
        ("classification", "efficientnet-lite0", str(skimage_picture("chelsea"))),
        ("detection", "yolov8n-nudenet", str(skimage_picture("astronaut"))),
        ("ocr", "pp-ocrv4", str(skimage_picture("page"))),
        ("vad", "silero-vad", _speech()),
    ]
    print(
        f"host: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"luodi {luodi.__version__}, onnxruntime target, median of {args.runs} calls"
    )
    with tempfile.TemporaryDirectory() as tmp:
        packages = {}
        for task, zoo, _ in cases:
            packages[task] = luodi.compile(f"zoo:{zoo}", Path(tmp) / f"{zoo}.luodi", verify=False).path
        print(f"\n{'pipeline':<15}{'input':<16}{'pre ms':>9}{'model ms':>10}{'post ms':>9}{'total ms':>10}")
        for task, _, raw in cases:
            with luodi.Session(packages[task], backend="onnxruntime") as s:
                t = _stages(s, raw, args.runs)
            print(
                f"{task:<15}{Path(raw).name:<16}{t['pre']:>9.1f}{t['model']:>10.1f}{t['post']:>9.1f}{t['total']:>10.1f}"
            )

        from rapidocr_onnxruntime import RapidOCR

        page = str(skimage_picture("page"))
        rapid = RapidOCR()
        with luodi.Session(packages["ocr"], backend="onnxruntime") as s:
            for _ in range(2):
                s.predict(page)
                rapid(page)
            ours, theirs = [], []
            for i in range(args.runs):
                sides = [(s.predict, ours), (rapid, theirs)]
                for call, sink in sides if i % 2 == 0 else sides[::-1]:
                    t0 = time.perf_counter()
                    call(page)
                    sink.append(time.perf_counter() - t0)
            same = [t.text for t in s.predict(page)] == [r[1] for r in rapid(page)[0]]
    a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(
        f"\nOCR end to end on page.png, onnxruntime CPU: luodi {a:.0f} ms, rapidocr_onnxruntime {b:.0f} ms, "
        f"ratio {a / b:.2f} (target <= 1.0: {'met' if a / b <= 1.0 else 'NOT met'}); same text: {same}"
    )


if __name__ == "__main__":
    main()
