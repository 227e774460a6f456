"""Fashion-MNIST CNN: fp32 vs post-training int8 vs quantisation-aware fine-tuned int8, on every int8 engine.

Trains the CNN here (luodi.zoo.fashion_mnist, seed 0), then exports it twice with one ``luodi.export`` call each:
PTQ (calibrated on 200 training images: minmax, bias correction, GPTQ rounding, the defaults) and QAT
(``qat=QATConfig(...)`` fine-tuning on training images; the int8 targets take the trained ranges). Every figure is
labelled accuracy on the 10,000 test images, which neither training nor calibration sees; "simulated" runs each
target's stored QDQ graph on onnxruntime's reference kernels, "deployed" runs the engine.
Usage: python benchmarks/qat.py [--epochs 1] [--qat-epochs 1] [--qat-samples 10000] [--loss labels|distill]

``--model lite0``: EfficientNet-Lite0 (zoo) instead, QAT by self-distillation on ai-benchmark's 100 classification
photos (the calibration set), top-1 agreement with the package's fp32 target on the 169 held-apart photos
(luodi.quant.data.imagenet_holdout, never used for fine-tuning or calibration); no fallback.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import luodi
from luodi.quant import simulate
from luodi.quant.qat import QATConfig
from luodi.zoo import fashion_mnist as fm

TARGETS = ["onnxruntime:int8", "openvino:int8"]


def accuracy(pkg: luodi.Package, target: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Labelled top-1 on ``images``, one image a sample (run_batch joins them where the target's batch is free; a
    target built at batch 1, rknn's, runs them one by one). A target that failed its compile-time verification is
    measured all the same, and said so."""
    backend, precision = target.split(":")
    entry = pkg.find_target(backend, precision) or {}
    if entry.get("status") == "failed":
        if not entry.get("files"):
            print(f"{target} did not compile: {entry.get('reason')}")
            return float("nan")
        print(f"{target} failed its compile-time verification ({entry.get('reason')}); measured anyway")
    feeds = [{"images": fm.to_input(images[i : i + 1])} for i in range(len(labels))]
    with luodi.Session(pkg.path, backend=backend, precision=precision, allow_failed=True) as s:
        outs = s.run_batch(feeds, max_batch=500)
    return float((np.concatenate([o["logits"].argmax(1) for o in outs]) == labels).mean())


def simulated(pkg: luodi.Package, target: str, images: np.ndarray, labels: np.ndarray) -> float | None:
    """Accuracy of the target's stored QDQ graph on onnxruntime's reference kernels; None for a target its own
    toolkit quantised (rknn, litert, mnn, ncnn, openvino with NNCF): there is no QDQ graph of luodi's to simulate."""
    import onnx

    record = pkg.find_target(*target.split(":")).get("quantization") or {}
    if "model" not in record:
        return None
    qdq = onnx.load_model_from_string(pkg.read(record["model"]))
    feeds = [{"images": fm.to_input(images[i : i + 500])} for i in range(0, len(labels), 500)]
    pred = np.concatenate([o["logits"].argmax(1) for o in simulate(qdq, feeds, batch=500)])
    return float((pred == labels).mean())


def ranges_used(pkg: luodi.Package, target: str) -> Any:
    """What the target's record says about the ranges it quantised with: luodi's calibration record, or for a target
    its toolkit quantised the count of tensors given QAT's ranges (rknn's ``trained_ranges``)."""
    entry = pkg.find_target(*target.split(":"))
    calibration = (entry.get("quantization") or {}).get("calibration", {})
    return {**calibration, **{k: v for k, v in entry.get("options", {}).items() if "range" in k}}


def lite0(args: argparse.Namespace, targets: list[str]) -> None:
    import torch

    from luodi.quant.data import load_feeds
    from luodi.tensor import specs_from_onnx
    from luodi.zoo.efficientnet import _pretrained_module, efficientnet_lite0

    src = efficientnet_lite0()
    inputs, _ = specs_from_onnx(src.model)
    # the module's own input (normalised), for fine-tuning; never a held-apart photo
    photos = np.concatenate([f["images"] for f in load_feeds("ai-benchmark", inputs, src.pipeline, 100)])
    module = _pretrained_module()
    example = torch.zeros(1, 3, 224, 224)
    common = dict(
        input_names=["images"],
        output_names=["logits"],
        pipeline=src.pipeline,
        calibration="ai-benchmark",
        calib_samples=100,
        validation="imagenet-holdout",
        accuracy_budget="50%",
        fallback=False,
    )

    def top1(pkg: luodi.Package, target: str) -> np.ndarray:
        # through the package's own pipeline: its passes fold the normalisation, so the graph takes pixel values
        held = load_feeds("imagenet-holdout", pkg.inputs, pkg.pipeline, what="validation")
        backend, precision = target.split(":")
        with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
            return np.array([int(s.run(f)["logits"].argmax()) for f in held])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ptq = luodi.export(module, example, Path(tmp) / "ptq.luodi", ["onnxruntime", *targets], **common)
        ref = top1(ptq, "onnxruntime:fp32")
        rows += [("PTQ", t, float((top1(ptq, t) == ref).mean())) for t in targets]
        t0 = time.perf_counter()
        config = QATConfig(
            data=photos, epochs=args.qat_epochs, lr=args.qat_lr, batch_size=8, loss="distill", train_mode=False
        )
        qat = luodi.export(
            module, example, Path(tmp) / "qat.luodi", ["onnxruntime", *targets], qat=config, log=print, **common
        )
        print(f"QAT export ({args.qat_epochs} epoch(s) on {len(photos)} photos) in {time.perf_counter() - t0:.0f} s")
        tuned = top1(qat, "onnxruntime:fp32")
        rows.append(("QAT fp32 (fine-tuned)", "onnxruntime:fp32", float((tuned == ref).mean())))
        for t in targets:
            rows.append(("QAT", t, float((top1(qat, t) == ref).mean())))
            print(t, ranges_used(qat, t))
    print(f"\nhost: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"EfficientNet-Lite0, top-1 agreement with fp32 on {len(ref)} held-apart photos\n")
    print("| model | target | agreement |\n|---|---|---|")
    for what, t, agree in rows:
        print(f"| {what} | {t} | {agree:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=1.0, help="float training epochs")
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-samples", type=int, default=10000, help="training images QAT fine-tunes on")
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--loss", default="labels", choices=["labels", "distill"])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--model", default="fashion", choices=["fashion", "lite0"])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    targets = args.targets.split(",")
    if args.model == "lite0":
        return lite0(args, targets)
    test_x, test_y = fm.load("test")
    train_x, train_y = fm.load("train")
    t0 = time.perf_counter()
    net = fm.train(epochs=args.epochs, seed=0)
    print(f"trained {args.epochs} epoch(s) in {time.perf_counter() - t0:.0f} s")
    example = torch.from_numpy(fm.to_input(test_x[:2]))
    common = dict(
        input_names=["images"],
        output_names=["logits"],
        calib_samples=200,
        validation=fm.to_input(train_x[-1000:]),  # the gate's samples: training images, never the test set
        accuracy_budget="5%",
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ptq = luodi.export(
            net,
            example,
            Path(tmp) / "ptq.luodi",
            ["onnxruntime", *targets],
            calibration="fashion-mnist:train",
            **common,
        )
        fp32 = accuracy(ptq, "onnxruntime:fp32", test_x, test_y)
        rows.append(("fp32", "onnxruntime:fp32", fp32, None))
        for t in targets:
            rows.append(("PTQ", t, accuracy(ptq, t, test_x, test_y), simulated(ptq, t, test_x, test_y)))
        t0 = time.perf_counter()
        n = args.qat_samples
        config = QATConfig(
            data=(fm.to_input(train_x[:n]), train_y[:n]), epochs=args.qat_epochs, lr=args.qat_lr, loss=args.loss
        )
        qat = luodi.export(net, example, Path(tmp) / "qat.luodi", ["onnxruntime", *targets], qat=config, **common)
        print(f"QAT export ({args.qat_epochs} epoch(s) on {n} images, {args.loss}) in {time.perf_counter() - t0:.0f} s")
        rows.append(
            ("QAT fp32 (fine-tuned)", "onnxruntime:fp32", accuracy(qat, "onnxruntime:fp32", test_x, test_y), None)
        )
        for t in targets:
            rows.append(("QAT", t, accuracy(qat, t, test_x, test_y), simulated(qat, t, test_x, test_y)))
            print(t, ranges_used(qat, t))
    print(f"\nhost: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"Fashion-MNIST test set (10000 images); fp32 {fp32:.2%}\n")
    print("| model | target | deployed | vs fp32 | simulated | deployed - simulated |")
    print("|---|---|---|---|---|---|")
    for what, t, acc, sim in rows:
        extra = f"{sim:.2%} | {100 * (acc - sim):+.2f}" if sim is not None else " | "
        print(f"| {what} | {t} | {acc:.2%} | {100 * (acc - fp32):+.2f} | {extra} |")


if __name__ == "__main__":
    main()
