"""What OpenVINO's CPU plugin runs an int8 QDQ graph's float layers in, per INFERENCE_PRECISION_HINT, on
EfficientNet-Lite0: for k = 0, 4, 8, 16, 31 of the most sensitive layers kept in float (luodi's ranking for
openvino), the kernels the performance counters report (``*_I8`` for int8, ``*_bf16`` / ``*_f32`` for the float
layers), top-1 agreement with the float model on the reporting half of the held-apart photos, and the median ms of
one picture (with the counters on, so slower than without). Calibration: the 100 ai-benchmark photos (minmax).
Usage: python benchmarks/int8_float_precision.py [--hints f32,bf16,f16]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

import luodi
from luodi.quant import PTQ, policy_of, quantize
from luodi.tensor import specs_from_onnx
from luodi.zoo import efficientnet_lite0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hints", default="f32,bf16")
    args = ap.parse_args()
    import openvino as ov

    t0 = time.perf_counter()
    src = efficientnet_lite0()
    ptq = PTQ(
        src.model,
        specs_from_onnx(src.model)[0],
        "ai-benchmark",
        pipeline=src.pipeline,
        validation="imagenet-holdout",
        log=lambda m: print(f"  [{time.perf_counter() - t0:6.1f}s] {m}", flush=True),
    )
    backend = luodi.get_backend("openvino")
    policy = policy_of(backend)
    calibration = ptq.calibration_for(policy)
    order = [r.node for r in ptq.rank_layers(backend)]
    ref, feeds, core = ptq.float_outputs("report"), ptq.report_feeds, ov.Core()
    print(f"{'float layers':>12s} {'hint':>5s} {'agreement':>9s} {'ms':>7s}  kernels")
    for k in (0, 4, 8, 16, 31):
        qdq = quantize(ptq.model, calibration, policy, exclude=order[:k])
        for hint in args.hints.split(","):
            compiled = core.compile_model(
                core.read_model(qdq.SerializeToString()),
                "CPU",
                {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True},
            )
            request = compiled.create_infer_request()
            got = np.concatenate([request.infer(f)[compiled.outputs[0]].copy() for f in feeds])
            times = []
            for _ in range(100):
                t = time.perf_counter()
                request.infer(feeds[0])
                times.append(time.perf_counter() - t)
            kernels = Counter(p.exec_type for p in request.profiling_info if str(p.status).endswith(".EXECUTED"))
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            print(f"{k:12d} {hint:>5s} {agree:9.2%} {np.median(times[10:]) * 1e3:7.2f}  {dict(kernels)}", flush=True)


if __name__ == "__main__":
    main()
