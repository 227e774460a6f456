"""rknn:int8 and rknn:fp16 (RK3588, on rknn-toolkit2's x86 simulator) against the fp32 model on EfficientNet-Lite0.

Calibrates on the 100 ai-benchmark classification photos, measures top-1 agreement and logits cosine against
onnxruntime fp32 on the held-apart real set (luodi.quant.data.imagenet_holdout), labelled top-1 on the 20 foolbox
ImageNet pictures, the time each target takes to build (compile + verification in the building session) and the
simulator's time per inference (a CPU simulation of the NPU: a figure for accuracy work, not the board's speed).
Needs the rknn toolchain (luodi toolchain install rknn).
Usage: python benchmarks/rknn.py [--platform rk3588] [--budget 99%] [--package effnet-rknn.luodi]
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

TARGETS = ["rknn:int8", "rknn:fp16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--platform", default="rk3588")
    ap.add_argument("--budget", default="99%", help="the int8 gate (default: report whatever it is)")
    ap.add_argument("--package", help="keep the package here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.package or Path(tmp) / "effnet-rknn.luodi")
        build_s: dict[str, float] = {}
        for target in TARGETS:  # one compile per target: its build time alone (calibration data loading included)
            t0 = time.perf_counter()
            part = out.with_name(f"{out.stem}-{target.replace(':', '-')}.luodi")
            pkg = luodi.compile(
                "zoo:efficientnet-lite0",
                part,
                ["onnxruntime", target],
                calibration="ai-benchmark" if target.endswith("int8") else None,
                validation="imagenet-holdout" if target.endswith("int8") else None,
                accuracy_budget=args.budget if target.endswith("int8") else "fp32",
                target_options={"rknn": {"platform": args.platform}},
            )
            build_s[target] = time.perf_counter() - t0
            report(pkg, target, build_s[target])


def report(pkg: luodi.Package, target: str, build_s: float) -> None:
    entry = pkg.find_target(*target.split(":"))
    print(f"\n{target}: {entry['status']} {entry.get('reason', '')}; compile {build_s:.0f} s", flush=True)
    q = entry.get("quantization") or {}
    if q:
        a, c, snr = q.get("agreement"), q.get("cosine"), q.get("snr_db")
        print(f"  compile-time record: agreement {a}, cosine {c}, SNR {snr} dB")
    holdout = load_feeds("imagenet-holdout", pkg.inputs, pkg.pipeline, what="validation")
    with luodi.Session(pkg, backend="onnxruntime") as s:
        ref = np.concatenate([s.run(f)["logits"] for f in holdout])
    t0 = time.perf_counter()
    with luodi.Session(pkg, backend=target, device="simulator") as s:
        load_s = time.perf_counter() - t0
        times, got = [], []
        for f in holdout:
            t1 = time.perf_counter()
            got.append(s.run(f)["logits"])
            times.append(time.perf_counter() - t1)
        got_a = np.concatenate(got)
        pictures = foolbox_imagenet()
        top1 = sum(int(s.predict(str(p), k=1)[0].index == label) for p, label in pictures)
    agree = float((got_a.argmax(1) == ref.argmax(1)).mean())
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ref, got_a)]
    print(
        f"  simulator: load (rebuild) {load_s:.1f} s, {np.median(times) * 1e3:.0f} ms per inference (median of "
        f"{len(times)}); agreement with fp32 {agree:.2%} ({int(round(agree * len(ref)))}/{len(ref)} held-out photos); "
        f"logits cosine mean {np.mean(cos):.4f} (min {np.min(cos):.4f}); foolbox labelled top-1 {top1}/20",
        flush=True,
    )


if __name__ == "__main__":
    main()
