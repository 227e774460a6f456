"""EfficientNet-Lite0 on every engine and precision: luodi vs the engine's raw API, side by side, in one run.

For each target in one package (every available backend, every precision it offers here) it times
batch 1 and batch 8 through ``luodi.Session.run`` and through the engine's own Python API on the very
artifact files the package holds, with the same engine settings, interleaving the two sides round by
round. Then it opens the package with ``backend="auto"`` and reports what auto chose against the
fastest fp32-accurate target measured here.

    .venv/bin/python benchmarks/engines.py            # about 3-4 minutes on 2 cores
    .venv/bin/python benchmarks/engines.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import luodi
from luodi import selection

Runner = Callable[[np.ndarray], object]
CANDIDATES = [
    "onnxruntime",
    "openvino",
    "openvino:bf16",
    "ncnn",
    "ncnn:fp16",
    "mnn",
    "mnn:fp16",
    "mnn:bf16",
    "torch",
    "torch:bf16",
]


# -- the engines' raw APIs, on the package's own artifact files -----------------------------------
def raw_onnxruntime(art: luodi.backends.Artifact) -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(art.files["model.onnx"], so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})


def raw_openvino(art: luodi.backends.Artifact) -> Runner:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(art.files["model.xml"].decode(), ov.Tensor(np.frombuffer(art.files["model.bin"], np.uint8)))
    hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[art.precision]
    req = core.compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    ).create_infer_request()
    return lambda x: req.infer({"images": x}, share_inputs=True).to_tuple()


def raw_torch(art: luodi.backends.Artifact) -> Runner:
    import torch

    module = torch.export.load(io.BytesIO(art.files["model.pt2"])).module()
    bf16 = art.precision == "bf16"

    def run(x: np.ndarray) -> object:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return module(torch.from_numpy(x)).float().numpy()

    return run


def _files(art: luodi.backends.Artifact) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="luodi-raw-"))
    for name, data in art.files.items():
        (folder / name).write_bytes(data)
    return folder


def raw_ncnn(art: luodi.backends.Artifact) -> Runner:
    import ncnn

    folder = _files(art)
    net = ncnn.Net()
    for flag, value in art.options["precision_flags"].items():  # the same flags luodi applies
        setattr(net.opt, flag, value)
    net.opt.num_threads = os.cpu_count()
    net.load_param(str(folder / "model.param"))
    net.load_model(str(folder / "model.bin"))
    blob_in, blob_out = art.options["inputs"][0]["blob"], art.options["outputs"][0]["blob"]

    def run(x: np.ndarray) -> object:
        outs = []
        for item in x:  # ncnn Mats have no batch axis: one extraction per image
            ex = net.create_extractor()
            ex.input(blob_in, ncnn.Mat(item))
            _, out = ex.extract(blob_out)
            outs.append(np.array(out))
        return outs

    return run


def raw_mnn(art: luodi.backends.Artifact) -> Runner:
    import MNN.expr as F
    import MNN.nn as nn

    folder = _files(art)
    threads = min(4, os.cpu_count() or 1)
    rt = nn.create_runtime_manager(
        ({"backend": "CPU", "precision": art.options["precision_mode"], "numThread": threads},)
    )
    module = nn.load_module_from_file(
        str(folder / "model.mnn"), ["images"], ["logits"], runtime_manager=rt, shape_mutable=True
    )

    def run(x: np.ndarray) -> object:
        (out,) = module.forward([F.const(x, x.shape, F.NCHW, F.float)])
        return np.array(out.read(), copy=True)

    return run


RAW: dict[str, Callable[[luodi.backends.Artifact], Runner]] = {
    "onnxruntime": raw_onnxruntime,
    "openvino": raw_openvino,
    "ncnn": raw_ncnn,
    "mnn": raw_mnn,
    "torch": raw_torch,
}


def interleaved(a: Runner, b: Runner, x: np.ndarray, rounds: int, calls: int) -> tuple[float, float, float]:
    """Median ms of ``a`` and ``b`` on ``x`` over ``rounds`` rounds of alternating blocks of ``calls``,
    and the median over rounds of the per-round ratio b/a (robust to the machine's drift)."""
    for f in (a, b):
        for _ in range(5):
            f(x)
    ta: list[float] = []
    tb: list[float] = []
    ratios: list[float] = []
    for r in range(rounds):
        block: dict[int, list[float]] = {0: [], 1: []}
        order = ((0, a), (1, b)) if r % 2 == 0 else ((1, b), (0, a))
        for side, f in order:
            gc.disable()
            for _ in range(calls):
                t0 = time.perf_counter()
                f(x)
                block[side].append(time.perf_counter() - t0)
            gc.enable()
        ta += block[0]
        tb += block[1]
        ratios.append(statistics.median(block[1]) / statistics.median(block[0]))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(ratios)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 3
    console = Console(width=None if sys.stdout.isatty() else 130)

    wanted = []
    for t in CANDIDATES:
        backend, _, precision = t.partition(":")
        if backend in luodi.backend_names() and backend in RAW:
            a = luodi.get_backend(backend).available()
            if a.ok and (precision or "fp32") in a.precisions:
                wanted.append(t)
    tmp = Path(tempfile.mkdtemp(prefix="luodi-engines-"))
    t0 = time.time()
    console.print(f"compiling EfficientNet-Lite0 for {', '.join(wanted)} ...")
    pkg = luodi.compile("zoo:efficientnet-lite0", tmp / "effnet.luodi", targets=wanted)
    console.print(f"compiled and verified in {time.time() - t0:.0f} s")

    table = Table(title="EfficientNet-Lite0, median latency (ms), luodi Session.run vs the engine's raw API")
    for col in ("target", "max abs err", "b1 raw", "b1 luodi", "b1 luodi/raw", "b8 raw", "b8 luodi", "b8 luodi/raw"):
        table.add_column(col, justify="right" if col != "target" else "left")
    rng = np.random.default_rng(0)
    latency: dict[str, float] = {}
    worst_ratio = 0.0
    for target in pkg.targets:
        name = f"{target['backend']}:{target['precision']}"
        ver = target["verification"]
        if not ver.get("passed"):
            table.add_row(name, "failed verification", "", "", "", "", "", "")
            continue
        raw = RAW[target["backend"]](pkg.artifact(target))
        row = [name, f"{ver['outputs']['logits']['max_abs']:.1e}"]
        with luodi.Session(pkg.path, backend=target["backend"], precision=target["precision"]) as s:
            for batch in (1, 8):
                x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
                r, lu, ratio = interleaved(raw, lambda v, s=s: s.run({"images": v}), x, args.rounds, args.calls)
                worst_ratio = max(worst_ratio, ratio)
                row += [f"{r:.2f}", f"{lu:.2f}", f"x{ratio:.3f}"]
                if batch == 1:
                    latency[name] = lu
        table.add_row(*row)
    console.print(table)

    fp32_ok = {n: ms for n, ms in latency.items() if selection.within_budget(pkg.find_target(*n.split(":")), "fp32")}
    fastest = min(fp32_ok, key=fp32_ok.get)
    with luodi.Session(pkg.path) as auto:
        chosen = f"{auto.backend}:{auto.precision}"
        console.print(f"auto chose {auto.selection}")
    ratio = latency[chosen] / fp32_ok[fastest]
    console.print(
        f"auto: {chosen} at {latency[chosen]:.2f} ms; fastest fp32-accurate target measured above: {fastest} at "
        f"{fp32_ok[fastest]:.2f} ms; ratio x{ratio:.3f} (target <= 1.05): {'met' if ratio <= 1.05 else 'NOT met'}"
    )
    console.print(
        f"worst luodi/raw ratio: x{worst_ratio:.3f} (target <= 1.03): {'met' if worst_ratio <= 1.03 else 'NOT met'}"
    )
    console.print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
