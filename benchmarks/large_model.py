"""A model over protobuf's 2 GB limit, end to end: build -> compile (passes, verify) -> package -> Session -> run.

    python benchmarks/large_model.py [--gib 2.25] [--target onnxruntime ...] [--no-verify]

The model is two MatMuls whose weights together exceed 2 GB (float32), so it cannot be one serialised ONNX
message: luodi stores it as ``model.onnx`` + ``model.onnx.data`` (ONNX external data) and hands the weights to
the engine from memory. Prints the time of each step, the package's members and the peak resident memory.
Needs about 9x the weight size in free memory (see docs/performance.md); not part of the test suite.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import luodi
from luodi import onnx_io


def rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**30


def build(gib: float, width: int = 256) -> object:
    """x[batch, width] @ w1 + x @ w2, max over the columns; w1 and w2 hold ``gib`` GiB together."""
    n = int(gib * 2**30 / 2 / 4 / width)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("MatMul", ["x", "w2"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["s"]),
        helper.make_node("ReduceMax", ["s"], ["y"], keepdims=0, axes=[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for name, scale in (("w1", 1e-3), ("w2", -7e-4)):  # written straight into the model: no extra copy
        t = model.graph.initializer.add()
        t.name, t.data_type = name, TensorProto.FLOAT
        t.dims.extend([width, n])
        t.raw_data = ((np.arange(width * n, dtype=np.float32) % 13 - 6) * scale).tobytes()
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.25, help="weight size in GiB (default 2.25: over the 2 GB limit)")
    ap.add_argument("--target", action="append", help="targets to compile (default onnxruntime)")
    ap.add_argument("--no-verify", action="store_true", help="skip the reference comparison at compile time")
    args = ap.parse_args()
    targets = args.target or ["onnxruntime"]
    t0 = time.perf_counter()
    model = build(args.gib)
    print(f"built: {onnx_io.weights_size(model) / 2**30:.2f} GiB of weights in {time.perf_counter() - t0:.1f} s")
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="luodi-large-") as tmp:
        out = Path(tmp) / "large.luodi"
        t = time.perf_counter()
        luodi.compile(
            model,
            out,
            targets=targets,
            verify=not args.no_verify,
            log=lambda m: print(f"  {time.perf_counter() - t:6.1f} s  rss {rss_gib():5.2f} GiB  {m}", flush=True),
        )
        print(f"compiled in {time.perf_counter() - t:.1f} s")
        with zipfile.ZipFile(out) as zf:
            for info in zf.infolist():
                print(f"  member {info.filename:45s} {info.file_size / 2**20:10.1f} MiB")
        want = None if args.no_verify else ReferenceEvaluator(model).run(None, {"x": x})[0]
        del model
        for target in targets:
            t = time.perf_counter()
            with luodi.Session(out, backend=target) as s:
                load = time.perf_counter() - t
                y = s.run({"x": x})["y"]
            err = "" if want is None else f", max abs err vs reference {np.abs(y - want).max():.2e}"
            print(f"{target}: Session load {load:.1f} s, y = {y}{err}")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
