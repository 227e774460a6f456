"""What luodi's graph passes buy, side by side in one run: the graph as exported vs after the passes.

For EfficientNet-Lite0 (zoo) and the Fashion-MNIST CNN (exported from PyTorch with luodi's frontend):

- nodes and initializers before/after ``luodi.compiler.passes.run_passes(model, "default", pipeline)``;
- onnxruntime batch-1 latency of both graphs, with ORT's own graph optimisations on (what luodi's
  onnxruntime target uses: ORT_ENABLE_ALL) and off (what an engine without an optimiser of its own
  sees), sides interleaved round by round; the ratio is the median of the per-round ratios;
- session creation time of both graphs;
- pre-processing time per image with the package's pipeline before and after the input
  normalisation was folded into the first convolution.

It reports, it does not assert.

    .venv/bin/python benchmarks/passes.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/passes.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from luodi.compiler.passes import run_passes
from luodi.pipeline import Pipeline
from luodi.tensor import specs_from_onnx


def sources() -> list[tuple[str, object, tuple[int, ...], object]]:
    """(label, SourceModel, batch-1 input shape, a raw picture for the pipeline)."""
    import torch

    from luodi.frontends.torch import from_torch
    from luodi.zoo import efficientnet_lite0
    from luodi.zoo import fashion_mnist as fm
    from luodi.zoo.images import skimage_picture

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist"))
    from train_and_deploy import pipeline as fm_pipeline  # the example's pipeline: the one the package ships

    torch.manual_seed(0)
    cnn = from_torch(
        fm.build_cnn().eval(),
        torch.zeros(1, 1, 28, 28),
        name="fashion-mnist-cnn",
        input_names=[fm.INPUT_NAME],
        output_names=[fm.OUTPUT_NAME],
        pipeline=fm_pipeline(),
    )
    picture = fm.load("test")[0][0]
    return [
        ("EfficientNet-Lite0", efficientnet_lite0(), (1, 3, 224, 224), skimage_picture("chelsea")),
        ("Fashion-MNIST CNN", cnn, (1, 1, 28, 28), picture),
    ]


def session(model: object, optimise: bool) -> tuple[ort.InferenceSession, float]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    data = model.SerializeToString()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess, (time.perf_counter() - t0) * 1e3


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Median ms per round for each side; the sides alternate and the order rotates each round."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                calls[n]()
                times.append(time.perf_counter() - t0)
            out[n].append(statistics.median(times) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, per_round = (5, 10) if args.quick else (20, 25)
    console = Console(width=140)
    graph = Table(title="graph passes: the graph as exported vs after luodi's default passes")
    for col in ("model", "nodes", "initializers", "passes ms", "ORT load ms (as exported -> passes)"):
        graph.add_column(col, justify="left" if col == "model" else "right")
    speed = Table(title="onnxruntime batch-1 median latency (ms), as exported vs after the passes, interleaved")
    for col in ("model", "ORT graph optimisation", "as exported", "after passes", "after/before"):
        speed.add_column(col, justify="left" if col in ("model", "ORT graph optimisation") else "right")
    pre = Table(title="pre-processing per image (ms): pipeline with normalize vs normalisation folded into the Conv")
    for col in ("model", "with normalize", "folded", "after/before"):
        pre.add_column(col, justify="left" if col == "model" else "right")

    for label, src, shape, picture in sources():
        t0 = time.perf_counter()
        opt, folded_pipeline, records = run_passes(src.model, "default", src.pipeline)
        passes_ms = (time.perf_counter() - t0) * 1e3
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        name = src.model.graph.input[0].name
        loads = []
        for optimise in (True, False):
            (before, load_b), (after, load_a) = session(src.model, optimise), session(opt, optimise)
            loads.append((load_b, load_a))
            res = interleaved(
                {
                    "before": lambda s=before, feeds={name: x}: s.run(None, feeds),
                    "after": lambda s=after, feeds={name: x}: s.run(None, feeds),
                },
                rounds,
                per_round,
            )
            ratio = statistics.median(a / b for a, b in zip(res["after"], res["before"]))
            speed.add_row(
                label,
                "ORT_ENABLE_ALL (luodi's target)" if optimise else "off",
                f"{statistics.median(res['before']):.3f}",
                f"{statistics.median(res['after']):.3f}",
                f"x{ratio:.3f}",
            )
        graph.add_row(
            label,
            f"{len(src.model.graph.node)} -> {len(opt.graph.node)}",
            f"{len(src.model.graph.initializer)} -> {len(opt.graph.initializer)}",
            f"{passes_ms:.0f}",
            f"{loads[0][0]:.0f} -> {loads[0][1]:.0f}",
        )
        inputs = specs_from_onnx(src.model)[0]
        with_norm, folded = Pipeline.from_spec(src.pipeline, inputs), Pipeline.from_spec(folded_pipeline, inputs)
        res = interleaved(
            {
                "with": lambda p=with_norm, raw=picture: p.preprocess(raw),
                "folded": lambda p=folded, raw=picture: p.preprocess(raw),
            },
            rounds,
            per_round,
        )
        ratio = statistics.median(a / b for a, b in zip(res["folded"], res["with"]))
        pre.add_row(
            label, f"{statistics.median(res['with']):.3f}", f"{statistics.median(res['folded']):.3f}", f"x{ratio:.3f}"
        )
        notes = "; ".join(f"{r.name}: {', '.join(r.notes)}" for r in records if r.nodes_before != r.nodes_after)
        console.print(f"[dim]{label}: {notes}[/]")
    console.print(graph)
    console.print(speed)
    console.print(pre)
    console.print(f"onnxruntime {ort.__version__}; {rounds} rounds x {per_round} calls per side")


if __name__ == "__main__":
    main()
