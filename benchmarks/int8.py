"""fp32 vs int8 latency per engine on EfficientNet-Lite0, from one run, with top-1 agreement beside each.

Calibrates on the 100 ai-benchmark classification photos, measures agreement on the held-apart real set
(luodi.quant.data.imagenet_holdout) and labelled top-1 on the 20 foolbox ImageNet pictures. Where the CPU runs
them, OpenVINO's fp16 and bf16 targets are measured on the same set too: what 16-bit floats keep of the float
model's top-1 is the yardstick for an 8-bit figure.
Usage: python benchmarks/int8.py [--budget 1%] [--method minmax] [--no-fallback] [--float-precision auto]
[--option BACKEND.KEY=VALUE ...] (e.g. ``--option openvino.quantizer=nncf --option openvino.nncf_preset=mixed``:
openvino:int8 quantised by NNCF). ``--float-precision`` is openvino's ``float_precision`` option: the precision the
fallback keeps layers in (bf16, fp16, fp32, or auto: each the CPU runs, the fastest within the budget); every
fallback's attempts (float layers, their precision, agreement on the tuning half, latency) and their Pareto front
are printed after the table.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import luodi
from luodi.arguments import engine_options
from luodi.quant.data import load_feeds
from luodi.zoo.images import foolbox_imagenet

ENGINES = ["onnxruntime", "openvino"]


def half_targets() -> list[str]:
    """openvino:fp16 / openvino:bf16 where this CPU runs them natively (a yardstick, not timed against int8)."""
    from luodi.backends import get_backend

    native = get_backend("openvino").device_precisions().get("CPU", ())
    return [f"openvino:{p}" for p in ("fp16", "bf16") if p in native]


def latency_ms(pkg: luodi.Package, target: str, x: np.ndarray, runs: int = 50) -> float:
    backend, precision = target.split(":")
    with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
        s.prepare({"images": x.shape})
        for _ in range(5):
            s.run({"images": x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run({"images": x})
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def labelled_top1(pkg: luodi.Package, target: str) -> int:
    backend, precision = target.split(":")
    pictures = foolbox_imagenet()
    with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
        return sum(int(s.predict(str(p), k=1)[0].index == label) for p, label in pictures)


def holdout_agreement(pkg: luodi.Package, target: str, feeds: list, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement with fp32 and the logits' SNR (dB) on the held-apart photos."""
    from luodi.quant import snr_db

    backend, precision = target.split(":")
    with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
        got = np.concatenate([s.run(f)["logits"] for f in feeds])
    return float((got.argmax(1) == reference.argmax(1)).mean()), snr_db(reference, got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", default="1%")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--no-fallback", action="store_true")
    ap.add_argument(
        "--validation",
        default="imagenet-holdout",
        help="what the fallback tunes on and the gate checks (split in halves): imagenet-holdout (the default, so "
        "the table's agreement shares photos with the tuning), or ai-benchmark (the calibration photos: the 169 "
        "held-apart photos of the table stay unseen)",
    )
    ap.add_argument("--option", action="append", default=[], help="an engine's compile option, BACKEND.KEY=VALUE")
    ap.add_argument("--float-precision", help="openvino:int8's float layers: fp32 (default), bf16, fp16 or auto")
    args = ap.parse_args()
    if args.float_precision:
        args.option.append(f"openvino.float_precision={args.float_precision}")
    targets = [f"{e}:{p}" for p in ("fp32", "int8") for e in ENGINES] + half_targets()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "effnet.luodi"
        t0 = time.perf_counter()
        try:
            pkg = luodi.compile(
                "zoo:efficientnet-lite0",
                out,
                targets,
                calibration="ai-benchmark",
                calib_method=args.method,
                validation=args.validation,
                accuracy_budget=args.budget,
                fallback=not args.no_fallback,
                target_options=engine_options(args.option),
                log=lambda m: print(f"  [{time.perf_counter() - t0:6.1f}s] {m}", flush=True),
            )
        except luodi.VerificationError as exc:
            print(f"the gate stopped the compile: {exc}")
            return
        print(f"compiled in {time.perf_counter() - t0:.0f} s")
        holdout = load_feeds("imagenet-holdout", pkg.inputs, pkg.pipeline, what="validation")
        batched = [
            {"images": np.concatenate([f["images"] for f in holdout[i : i + 16]])} for i in range(0, len(holdout), 16)
        ]
        with luodi.Session(pkg.path, backend="onnxruntime", precision="fp32") as s:
            reference = np.concatenate([s.run(f)["logits"] for f in batched])
        x = holdout[0]["images"]
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
        print(f"\nEfficientNet-Lite0, batch 1, median of 50 runs; {cpu}, {platform.machine()}")
        agree_col = f"agree(held-out {len(holdout)})"
        print(f"{'target':20s} {'ms':>8s} {agree_col:>22s} {'SNR dB':>7s} {'foolbox top-1':>14s}  float layers")
        rows = {}
        for target in targets:
            entry = pkg.find_target(*target.split(":"))
            if entry.get("status") == "failed":  # e.g. outside the compile's int8 tolerance; the reason is the row
                print(f"{target:20s} failed at compile time: {entry.get('reason', '')[:200]}")
                continue
            ms = latency_ms(pkg, target, x)
            agree, snr = holdout_agreement(pkg, target, batched, reference)
            top1 = labelled_top1(pkg, target)
            q = entry.get("quantization", {})
            floats = f"{len(q['float_layers'])} {q.get('float_precision', 'fp32')}" if q.get("float_layers") else ""
            rows[target] = ms
            print(f"{target:20s} {ms:8.2f} {agree:22.2%} {snr:7.2f} {top1:>11d}/20  {floats}")
        best_fp32 = min(v for k, v in rows.items() if k.endswith("fp32"))
        # fp16/bf16 rows are the yardstick for agreement; the speed-up compares int8 with fp32 only
        int8 = [v for k, v in rows.items() if k.endswith("int8")]
        if int8:
            print(f"best int8 vs best fp32: {best_fp32 / min(int8):.2f}x faster")
        for target in targets:
            fallback_report(target, pkg.find_target(*target.split(":")))


def fallback_report(target: str, entry: dict) -> None:
    """The fallback's attempts and their Pareto front, as the package records them (agreement on the tuning half of
    the held-apart photos, latency of one batch-1 picture on the engine during the compile)."""
    decision = (entry.get("quantization") or {}).get("fallback")
    if not decision:
        return
    print(
        f"\n{target} fallback (budget {decision['budget']:.2%}, tuning half): chose {len(decision['float_nodes'])} "
        f"float layers in {decision.get('float_precision', 'fp32')}, {decision['agreement']:.2%}, "
        f"{decision.get('latency_ms')} ms, budget {'met' if decision['met'] else 'not met'}"
    )
    front = decision.get("pareto", [])
    print(f"  {'float layers':>12s} {'precision':>9s} {'agreement':>9s} {'ms':>7s}  Pareto")
    for step in sorted(decision["steps"], key=lambda s: (s["float_precision"], s["float_layers"])):
        mark = "*" if step in front else ""
        print(
            f"  {step['float_layers']:12d} {step['float_precision']:>9s} {step['agreement']:9.2%} "
            f"{step.get('latency_ms', float('nan')):7.2f}  {mark}"
        )


if __name__ == "__main__":
    main()
