"""luodi's own per-call overhead over a raw ``onnxruntime.InferenceSession``, side by side, in one run.

What it measures
----------------
1. EfficientNet-Lite0 (``zoo:efficientnet-lite0``, input ``images`` float32 [1,3,224,224]):
   ``luodi.Session(pkg).run({"images": x})`` against ``onnxruntime.InferenceSession.run(None, ...)``.
   Target: luodi median / raw median <= 1.02.
2. A tiny model (one 4x4 Gemm, opset 17) where the engine needs only a few microseconds, so what is
   left is luodi's Python overhead: ``Session.run`` and the six-verb path
   ``set_tensor + forward + get_tensor``. Target: luodi median - raw median <= 20 us per call.

How
---
Both models are compiled with ``luodi.compile(..., targets=["onnxruntime"], verify=False)``. The raw
session is built on the very bytes luodi's engine loads (the target's ``model.onnx`` member, read
with ``luodi.Package.read``), with the SessionOptions the luodi backend's ``load()`` sets
(``ORT_ENABLE_ALL``, default thread count, log severity 3) and ``CPUExecutionProvider``.

Every side is warmed up, then for R rounds each side runs a block of N calls, sides alternating
(the order rotates every round, so no side always runs first on a noisy machine). Each call is
timed on its own with ``time.perf_counter_ns``; the garbage collector is paused inside a block.
Reported: median and p90 per side; the ratio or the added microseconds between medians.

The script reports, it does not assert: it always exits 0 and prints one met / NOT met line per
target.

Run::

    .venv/bin/python benchmarks/overhead.py            # full run, about 35 s on 2 cores
    .venv/bin/python benchmarks/overhead.py --quick    # smoke run, a few seconds after compiling
    .venv/bin/python benchmarks/overhead.py --rounds 30 --calls 40 --tiny-calls 5000
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

import luodi

RATIO_TARGET = 1.02  # EfficientNet-Lite0: luodi median / raw median
ADDED_US_TARGET = 20.0  # tiny model: luodi median - raw median, microseconds per call


# -- models and sessions -------------------------------------------------------------------------
def tiny_gemm() -> onnx.ModelProto:
    """y = x @ W + b with x float32 [4,4]: the engine time is a few microseconds."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="luodi-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def raw_session(pkg_path: Path) -> tuple[ort.InferenceSession, str]:
    """An InferenceSession on the bytes luodi's onnxruntime engine loads, with the same options."""
    pkg = luodi.Package(pkg_path)
    member = pkg.find_target("onnxruntime", "fp32")["files"]["model.onnx"]
    data = pkg.read(member)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # as OnnxRuntimeBackend.load()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as OnnxRuntimeBackend.load()
    # intra_op_num_threads left at its default, as load() does when Session(threads=None)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]), member


# -- measurement ---------------------------------------------------------------------------------
def interleaved(sides: dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int) -> dict[str, np.ndarray]:
    """Per-call nanoseconds for each side, measured in alternating blocks of ``calls`` calls."""
    names = list(sides)
    for name in names:
        fn = sides[name]
        for _ in range(warmup):
            fn()
    times = {name: np.empty(rounds * calls, dtype=np.int64) for name in names}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = sides[name]
                out = times[name]
                base = r * calls
                gc.collect()
                gc.disable()
                for i in range(calls):
                    t0 = clock()
                    fn()
                    out[base + i] = clock() - t0
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()
    return times


@dataclass
class Stats:
    median_us: float
    p90_us: float

    @classmethod
    def of(cls, ns: np.ndarray) -> Stats:
        return cls(float(np.median(ns)) / 1e3, float(np.percentile(ns, 90)) / 1e3)

    def __str__(self) -> str:
        return f"{fmt_us(self.median_us)}\n(p90 {fmt_us(self.p90_us)})"


def fmt_us(us: float) -> str:
    return f"{us / 1e3:.3f} ms" if us >= 1000 else f"{us:.2f} us"


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per model (default 30)")
    ap.add_argument("--calls", type=int, default=None, help="EfficientNet-Lite0 calls per block (default 50)")
    ap.add_argument("--tiny-calls", type=int, default=None, help="tiny-model calls per block (default 2000)")
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 30)
    calls = args.calls or (5 if args.quick else 50)
    tiny_calls = args.tiny_calls or (200 if args.quick else 2000)

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    started = time.perf_counter()
    console.print(
        f"luodi {luodi.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {_cpus()} CPU(s)"
    )
    rows: list[tuple[str, str, str, str, str, bool]] = []
    verdicts: list[tuple[str, bool]] = []

    with tempfile.TemporaryDirectory(prefix="luodi-bench-") as tmpdir:
        tmp = Path(tmpdir)

        # 1. EfficientNet-Lite0 ----------------------------------------------------------------
        console.print("compiling zoo:efficientnet-lite0 ...")
        t0 = time.perf_counter()
        pkg = luodi.compile("zoo:efficientnet-lite0", tmp / "e.luodi", targets=["onnxruntime"], verify=False)
        console.print(f"  compiled in {time.perf_counter() - t0:.1f} s")
        sess = luodi.Session(pkg)
        raw, member = raw_session(pkg.path)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
        feeds = {"images": x}
        np.testing.assert_allclose(sess.run(feeds)["logits"], raw.run(None, feeds)[0], rtol=1e-5, atol=1e-5)
        console.print(
            f"  raw session on member {member}; luodi selected {sess.selection}; "
            f"measuring {rounds} rounds x {calls} calls per side ..."
        )
        t0 = time.perf_counter()
        ms = interleaved(
            {"raw": lambda: raw.run(None, feeds), "luodi": lambda: sess.run(feeds)},
            rounds=rounds,
            calls=calls,
            warmup=max(3, calls // 2),
        )
        console.print(f"  measured in {time.perf_counter() - t0:.1f} s")
        r_stats, l_stats = Stats.of(ms["raw"]), Stats.of(ms["luodi"])
        ratio = l_stats.median_us / r_stats.median_us
        per_round = np.median(ms["luodi"].reshape(rounds, calls), axis=1) / np.median(
            ms["raw"].reshape(rounds, calls), axis=1
        )
        console.print(
            f"  noise check: per-round ratio of block medians: median x{np.median(per_round):.4f}, "
            f"range x{per_round.min():.4f} .. x{per_round.max():.4f}"
        )
        ok = ratio <= RATIO_TARGET
        rows.append(
            ("EfficientNet-Lite0: Session.run", str(r_stats), str(l_stats), f"x{ratio:.4f}", f"<= x{RATIO_TARGET}", ok)
        )
        verdicts.append((f"EfficientNet-Lite0 Session.run: ratio {ratio:.4f} (target <= {RATIO_TARGET})", ok))
        sess.close()

        # 2. tiny model ------------------------------------------------------------------------
        console.print("compiling tiny 4x4 Gemm ...")
        tpkg = luodi.compile(tiny_gemm(), tmp / "t.luodi", targets=["onnxruntime"], verify=False)
        tsess = luodi.Session(tpkg)
        traw, tmember = raw_session(tpkg.path)
        tx = np.random.default_rng(2).standard_normal((4, 4), dtype=np.float32)
        tfeeds = {"x": tx}
        np.testing.assert_allclose(tsess.run(tfeeds)["y"], traw.run(None, tfeeds)[0], rtol=1e-6)

        def six_verbs() -> np.ndarray:
            tsess.set_tensor("x", tx)
            tsess.forward()
            return tsess.get_tensor("y")

        console.print(f"  raw session on member {tmember}; measuring {rounds} rounds x {tiny_calls} calls per side ...")
        t0 = time.perf_counter()
        ts = interleaved(
            {"raw": lambda: traw.run(None, tfeeds), "luodi": lambda: tsess.run(tfeeds), "six": six_verbs},
            rounds=rounds,
            calls=tiny_calls,
            warmup=max(100, tiny_calls // 4),
        )
        console.print(f"  measured in {time.perf_counter() - t0:.1f} s")
        tr = Stats.of(ts["raw"])
        for side, label in (("luodi", "Session.run"), ("six", "set_tensor+forward+get_tensor")):
            st = Stats.of(ts[side])
            added = st.median_us - tr.median_us
            ok = added <= ADDED_US_TARGET
            rows.append(
                (f"tiny Gemm 4x4: {label}", str(tr), str(st), f"+{added:.2f} us", f"<= +{ADDED_US_TARGET:g} us", ok)
            )
            verdicts.append((f"tiny Gemm {label}: +{added:.2f} us per call (target <= {ADDED_US_TARGET:g} us)", ok))
        tsess.close()

    table = Table(title=f"luodi overhead over raw onnxruntime ({rounds} interleaved rounds)")
    for col, justify in (
        ("model", "left"),
        ("raw median", "right"),
        ("luodi median", "right"),
        ("ratio / added us", "right"),
        ("target", "right"),
        ("ok?", "center"),
    ):
        table.add_column(col, justify=justify)
    for model, raw_s, luodi_s, diff, target, ok in rows:
        table.add_row(model, raw_s, luodi_s, diff, target, "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(table)
    for line, ok in verdicts:
        console.print(f"[green]{line}: met[/]" if ok else f"[red]{line}: NOT met[/]")
    console.print(f"total time: {time.perf_counter() - started:.1f} s")
    return 0


def _cpus() -> int | str:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or "?"


if __name__ == "__main__":
    sys.exit(main())
