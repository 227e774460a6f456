"""litert:fp32 and litert:int8 against the fp32 model on EfficientNet-Lite0 (zoo), in-process with ai-edge-litert.

Compiles the zoo model (exported from PyTorch: litert-torch converts its torch.export program, ai-edge-quantizer
makes the int8 file full integer) calibrated on the 100 ai-benchmark classification photos, and reports the time
each target takes to convert (conversion, quantisation and compile-time verification: one compile per target), the
interpreter's latency at batch 1 with 1 and 2 threads (median), top-1 agreement with onnxruntime fp32 on the
held-apart photos (luodi.quant.data.imagenet_holdout) and on foolbox's 20 ImageNet pictures, and labelled top-1 on
those 20. With --estimate CONFIG, Vela's Ethos-U estimate of the int8 file (luodi[vela]).
Usage: python benchmarks/litert.py [--estimate ethos-u55-128] [--runs 50] [--package lite0-litert.luodi]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import luodi
from luodi.quant.data import load_feeds
from luodi.zoo.images import foolbox_imagenet

TARGETS = ["litert:fp32", "litert:int8"]
REFERENCE = "onnxruntime:fp32"


def latency_ms(pkg: luodi.Package, target: str, feed: dict[str, np.ndarray], threads: int, runs: int) -> float:
    backend, precision = target.split(":")
    with luodi.Session(pkg.path, backend=backend, precision=precision, threads=threads, allow_failed=True) as s:
        for _ in range(3):
            s.run(feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run(feed)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimate", action="append", default=[], help="a Vela config, e.g. ethos-u55-128")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--package", help="keep the last package here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.package or Path(tmp) / "lite0-litert.luodi")
        seconds: dict[str, float] = {}
        pkgs: dict[str, luodi.Package] = {}
        for target in [REFERENCE, *TARGETS]:  # one compile per target: its own conversion time
            t0 = time.perf_counter()
            extra: dict = {}
            if target == "litert:int8":
                extra = {"calibration": "ai-benchmark", "validation": "imagenet-holdout", "fallback": False}
                extra["accuracy_budget"] = "99%"
                if args.estimate:
                    extra["estimate"] = args.estimate
            pkgs[target] = luodi.compile(
                "zoo:efficientnet-lite0",
                out.with_name(f"{out.stem}-{target.replace(':', '-')}.luodi"),
                [target],
                **extra,
            )
            seconds[target] = time.perf_counter() - t0
        holdout = load_feeds("imagenet-holdout", pkgs[REFERENCE].inputs, pkgs[REFERENCE].pipeline, what="validation")
        pictures = foolbox_imagenet()

        def classify(target: str) -> tuple[np.ndarray, list[int]]:
            backend, precision = target.split(":")
            with luodi.Session(pkgs[target].path, backend=backend, precision=precision, allow_failed=True) as s:
                logits = np.concatenate([s.run(f)["logits"] for f in holdout])
                top1 = [s.predict(str(p), k=1)[0].index for p, _ in pictures]
            return logits, top1

        ref_logits, ref_top1 = classify(REFERENCE)
        labels = [label for _, label in pictures]
        print(f"EfficientNet-Lite0, {len(holdout)} held-apart photos, foolbox's {len(pictures)} pictures")
        print(
            f"{'target':14s} {'convert s':>9s} {'1 thread ms':>11s} {'2 threads ms':>12s} {'agree held':>10s} "
            f"{'cosine':>7s} {'agree foolbox':>13s} {'foolbox top-1':>13s}  estimate"
        )
        speed: dict[str, float] = {}
        for target in [REFERENCE, *TARGETS]:
            logits, top1 = classify(target)
            agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
            cos = float(np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(logits, ref_logits)]))
            fool_agree = sum(int(a == b) for a, b in zip(top1, ref_top1))
            fool_top1 = sum(int(a == b) for a, b in zip(top1, labels))
            ms = [latency_ms(pkgs[target], target, holdout[0], n, args.runs) for n in (1, 2)]
            speed[target] = ms[0]
            entry = pkgs[target].find_target(*target.split(":"))
            est = ", ".join(
                f"{c} {e['inference_ms']:.1f} ms, {e['npu_ops']} NPU / {e['cpu_ops']} CPU ops"
                for c, e in (entry.get("estimate") or {}).items()
            )
            status = entry.get("status")
            if status != "verified":
                print(f"{target}: {status}: {entry.get('reason')}")
            print(
                f"{target:14s} {seconds[target]:9.1f} {ms[0]:11.2f} {ms[1]:12.2f} {agree:10.1%} {cos:7.4f} "
                f"{fool_agree:>10d}/{len(pictures)} {fool_top1:>10d}/{len(pictures)}  {est}"
            )
        print(f"litert:int8 is {speed['litert:fp32'] / speed['litert:int8']:.2f}x litert:fp32's speed at 1 thread")


if __name__ == "__main__":
    main()
