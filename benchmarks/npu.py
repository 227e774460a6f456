"""Integer-only targets side by side: every int8 engine on three real models, from one run.

For each model the same package is compiled to fp32 and to every int8 target named (default: onnxruntime:int8,
openvino:int8, rknn:int8, litert:int8, plus litert:fp32 for LiteRT's own speed-up), with the same calibration
data and without the fallback (every layer int8, so the figures are the quantiser's and the engine's, not the
search's). Then, against the onnxruntime:fp32 target of the same package:

- EfficientNet-Lite0 (zoo): top-1 agreement on the held-apart photos (luodi.quant.data.imagenet_holdout; the
  calibration photos are ai-benchmark's classification set) and foolbox's 20 labelled ImageNet pictures;
- the Fashion-MNIST CNN (trained here, calibrated on its training split): accuracy on the 10k test set;
- nudenet's YOLOv8n (zoo): box IoU with the fp32 detections on real photos (each fp32 box matched to the best
  box of the same class; a missed box counts 0) and how many fp32 boxes are found at IoU >= 0.5.

Latency is batch 1, median: on this CPU for the CPU engines and LiteRT, the x86 simulator's time for rknn (not the
board's), and Ethos-U's estimate from Vela where the litert:int8 target carries one. A target whose backend is not
installed here is listed with the reason. Usage:
    python benchmarks/npu.py [--models lite0,fashion,yolo] [--targets onnxruntime:int8,...] [--photos 40]
                             [--option rknn.algorithm=mmse ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import luodi
from luodi.quant.data import imagenet_holdout, load_feeds

INT8 = ["onnxruntime:int8", "openvino:int8", "rknn:int8", "litert:int8"]
EXTRA = ["litert:fp32"]
REFERENCE = "onnxruntime:fp32"


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def usable(targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """The targets whose backend is available here, and why each other one is not."""
    from luodi.backends import get_backend

    ok, why = [], {}
    for t in targets:
        try:
            avail = get_backend(t.split(":")[0]).available()
        except luodi.LuodiError as exc:
            why[t] = str(exc)
            continue
        if avail.ok:
            ok.append(t)
        else:
            why[t] = " ".join(x for x in (avail.reason, avail.install) if x) or "unavailable"
    return ok, why


def session(pkg: luodi.Package, target: str, **kw: Any) -> luodi.Session:
    backend, precision = target.split(":")
    return luodi.Session(pkg.path, backend=backend, precision=precision, allow_failed=True, **kw)


def latency_ms(pkg: luodi.Package, target: str, feed: dict[str, np.ndarray], runs: int = 30) -> float:
    with session(pkg, target) as s:
        s.run(feed)
        if target.startswith("rknn"):
            runs = 5  # the simulator: slow, and its time is not the board's
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run(feed)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def estimate_of(pkg: luodi.Package, target: str) -> str:
    entry = pkg.find_target(*target.split(":"))
    est = entry.get("estimate") or {}
    if not isinstance(est, dict) or not est:
        return ""
    parts = []
    for config, e in est.items():
        if isinstance(e, dict) and e.get("inference_ms") is not None:
            parts.append(f"{config} {float(e['inference_ms']):.1f} ms (Vela)")
    return ", ".join(parts)


def vela(targets: list[str]) -> dict[str, Any]:
    """``estimate=["ethos-u55-128"]`` for a compile with litert:int8 where Vela is installed (luodi[vela])."""
    import importlib.util

    if "litert:int8" in targets and importlib.util.find_spec("ethosu") is not None:
        return {"estimate": ["ethos-u55-128"]}
    return {}


def compiled(
    model: Any, out: Path, targets: list[str], log: Callable[[str], None], **options: Any
) -> tuple[luodi.Package, list[str], dict[str, str]]:
    """Compile once to every target; the targets that passed and why each other one failed."""
    t0 = time.perf_counter()
    pkg = luodi.compile(
        model,
        out,
        targets,
        accuracy_budget="99%",
        fallback=False,
        target_options={k: v for k, v in OPTIONS.items() if any(t.startswith(k + ":") for t in targets)} or None,
        log=lambda m: log(f"  [{time.perf_counter() - t0:6.1f}s] {m}"),
        **vela(targets),
        **options,
    )
    ok, failed = [], {}
    for t in targets:
        entry = pkg.find_target(*t.split(":"))
        if entry.get("status") == "failed":
            failed[t] = str(entry.get("reason", "failed"))
            if entry.get("files"):  # compiled, then failed its verification: measured anyway, and said so
                ok.append(t)
                failed[t] = "measured above although it failed compile-time verification: " + failed[t]
        else:
            ok.append(t)
    log(f"  compiled in {time.perf_counter() - t0:.0f} s")
    return pkg, ok, failed


def report(title: str, columns: list[str], rows: list[tuple[str, list[str]]], failed: dict[str, str]) -> None:
    print(f"\n{title}")
    print(f"{'target':18s} " + " ".join(f"{c:>20s}" for c in columns))
    for target, cells in rows:
        print(f"{target:18s} " + " ".join(f"{c:>20s}" for c in cells))
    for target, why in failed.items():
        print(f"{target:18s} {'' if why.startswith('measured') else 'not measured: '}{why.splitlines()[0][:200]}")


OPTIONS: dict[str, dict[str, str]] = {}  # --option BACKEND.KEY=VALUE: the compile's target_options


def lite0(targets: list[str], tmp: Path, photos: int, log: Callable[[str], None]) -> None:
    from luodi.zoo.images import foolbox_imagenet

    pkg, ok, failed = compiled(
        "zoo:efficientnet-lite0",
        tmp / "lite0.luodi",
        [REFERENCE, *targets],
        log,
        calibration="ai-benchmark",
        validation="imagenet-holdout",
    )
    holdout = load_feeds("imagenet-holdout", pkg.inputs, pkg.pipeline, what="validation")
    with session(pkg, REFERENCE) as s:
        reference = np.concatenate([s.run(f)["logits"] for f in holdout])
    pictures = foolbox_imagenet()
    rows = []
    for t in ok:
        with session(pkg, t) as s:
            got = np.concatenate([s.run(f)["logits"] for f in holdout])
            top1 = sum(int(s.predict(str(p), k=1)[0].index == label) for p, label in pictures)
        agree = float((got.argmax(1) == reference.argmax(1)).mean())
        cos = float(np.mean([np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(got, reference)]))
        ms = latency_ms(pkg, t, holdout[0])
        rows.append((t, [f"{agree:.1%}", f"{cos:.4f}", f"{top1}/20", f"{ms:.2f}", estimate_of(pkg, t)]))
    cols = [f"agree ({len(holdout)} held)", "logits cosine", "foolbox top-1", "ms (batch 1)", "estimate"]
    report("EfficientNet-Lite0 (zoo), vs onnxruntime:fp32", cols, rows, failed)


def fashion(targets: list[str], tmp: Path, photos: int, log: Callable[[str], None]) -> None:
    import torch

    from luodi.zoo import fashion_mnist as fm

    images, labels = fm.load("test")
    torch.manual_seed(0)
    log("  training the Fashion-MNIST CNN (1 epoch)")
    net = fm.train(epochs=1.0, seed=0)
    t0 = time.perf_counter()
    pkg = luodi.export(
        net,
        torch.from_numpy(fm.to_input(images[:1])),
        tmp / "fashion.luodi",
        targets=[REFERENCE, *targets],
        input_names=["images"],
        output_names=["logits"],
        calibration="fashion-mnist:train",
        calib_samples=200,
        validation=fm.to_input(images[-1000:]),
        accuracy_budget="99%",
        fallback=False,
        target_options={k: v for k, v in OPTIONS.items() if any(t.startswith(k + ":") for t in targets)} or None,
        log=lambda m: log(f"  [{time.perf_counter() - t0:6.1f}s] {m}"),
        **vela(targets),
    )
    ok, failed = [], {}
    for t in [REFERENCE, *targets]:
        entry = pkg.find_target(*t.split(":")) or {}
        if entry.get("status") != "failed":
            ok.append(t)
        elif entry.get("files"):  # compiled, then failed its verification: measured anyway, and said so (as lite0)
            ok.append(t)
            failed[t] = "measured above although it failed compile-time verification: " + str(entry.get("reason"))
        elif entry:
            failed[t] = str(entry.get("reason"))
    rows = []
    feeds = [fm.to_input(images[i : i + 1]) for i in range(len(labels))]
    for t in ok:
        with session(pkg, t) as s:
            outs = s.run_batch([{"images": x} for x in feeds], max_batch=500)
        predicted = np.concatenate([o["logits"].argmax(1) for o in outs])
        acc = float((predicted == labels).mean())
        ms = latency_ms(pkg, t, {"images": feeds[0]})
        rows.append((t, [f"{acc:.2%}", f"{ms:.3f}", estimate_of(pkg, t)]))
    report(
        "Fashion-MNIST CNN (trained here, 1 epoch): 10k test accuracy",
        ["accuracy", "ms (batch 1)", "estimate"],
        rows,
        failed,
    )


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def yolo(targets: list[str], tmp: Path, photos: int, log: Callable[[str], None]) -> None:
    from luodi.zoo.images import skimage_picture

    pictures = [skimage_picture("astronaut"), *imagenet_holdout()[:photos]]
    pkg, ok, failed = compiled(
        "zoo:yolov8n-nudenet", tmp / "yolo.luodi", [REFERENCE, *targets], log, calibration="ai-benchmark"
    )
    with session(pkg, REFERENCE) as s:
        reference = [s.predict(str(p)) for p in pictures]
    n_ref = sum(len(r) for r in reference)
    rows = []
    for t in ok:
        with session(pkg, t) as s:
            got = [s.predict(str(p)) for p in pictures]
            ious = [
                max((iou(d.box, e.box) for e in found if e.index == d.index), default=0.0)
                for want, found in zip(reference, got)
                for d in want
            ]
            x = {"images": np.zeros((1, 3, 320, 320), np.float32)}
        ms = latency_ms(pkg, t, x)
        mean = float(np.mean(ious)) if ious else float("nan")
        found = sum(v >= 0.5 for v in ious)
        rows.append((t, [f"{mean:.3f}", f"{found}/{n_ref}", f"{ms:.2f}", estimate_of(pkg, t)]))
    cols = ["mean box IoU", "fp32 boxes found", "ms (batch 1)", "estimate"]
    report(f"YOLOv8n (nudenet), {len(pictures)} photos, vs onnxruntime:fp32 boxes", cols, rows, failed)


MODELS = {"lite0": lite0, "fashion": fashion, "yolo": yolo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lite0,fashion,yolo")
    ap.add_argument("--targets", default=",".join(INT8 + EXTRA))
    ap.add_argument("--photos", type=int, default=40, help="held-apart photos for the detector's IoU")
    ap.add_argument("--option", action="append", default=[], help="BACKEND.KEY=VALUE, as luodi compile takes it")
    args = ap.parse_args()
    for opt in args.option:
        key, _, value = opt.partition("=")
        backend, _, name = key.partition(".")
        OPTIONS.setdefault(backend, {})[name] = value
    if OPTIONS:
        print(f"target options: {OPTIONS}")
    targets, why = usable([t for t in args.targets.split(",") if t])
    print(f"{cpu_name()}, {platform.machine()}; luodi {luodi.__version__}")
    for t, reason in why.items():
        print(f"{t}: not installed here ({reason.splitlines()[0]})")

    def log(m: str) -> None:
        print(m, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"\n--- {name}", flush=True)
            MODELS[name](targets, Path(tmp), args.photos, log)


if __name__ == "__main__":
    main()
