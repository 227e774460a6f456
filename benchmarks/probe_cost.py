"""What the crash probe costs on EfficientNet-Lite0: the first load of a target on a host, and every later one.

For ncnn and MNN (the crash-prone engines), ``luodi.Session(pkg, backend=X)`` is timed with an empty luodi
cache (the probe runs: a child process loads the engine file and runs it once at the representative shapes),
then again with the verdict cached, and the engine's own load without any probe (``Backend.load``) for
reference. Each figure is the median of ``--repeats`` runs, each first load with a fresh cache folder.

Run::

    python benchmarks/probe_cost.py [--repeats 3] [--package efficientnet.luodi]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import luodi
from luodi.backends import LoadOptions, get_backend


def session_s(pkg: luodi.Package, backend: str) -> float:
    t0 = time.perf_counter()
    luodi.Session(pkg, backend=backend).close()
    return time.perf_counter() - t0


def load_s(artifact: object, backend: str) -> float:
    t0 = time.perf_counter()
    get_backend(backend).load(artifact, LoadOptions()).close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--package", type=Path, help="an EfficientNet-Lite0 package with ncnn and mnn targets")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="luodi-probe-cost-") as tmp:
        pkg_path = args.package
        if pkg_path is None:
            from luodi.zoo import efficientnet_lite0

            pkg_path = Path(tmp, "efficientnet-lite0.luodi")
            luodi.compile(efficientnet_lite0(), pkg_path, targets=["ncnn", "mnn"], verify=False)
        pkg = luodi.Package(pkg_path)
        table = Table(title=f"Session() on EfficientNet-Lite0, median of {args.repeats} (s)")
        for col in ("engine", "first load (probe)", "cached", "engine load alone", "probe cost"):
            table.add_column(col, justify="right")
        for backend in ("ncnn", "mnn"):
            first, cached, bare = [], [], []
            target = pkg.find_target(backend, "fp32")
            for i in range(args.repeats):
                os.environ["LUODI_CACHE_DIR"] = str(Path(tmp, f"cache-{backend}-{i}"))
                first.append(session_s(pkg, backend))
                cached.append(session_s(pkg, backend))
                bare.append(load_s(pkg.artifact(target), backend))
            f, c, b = (statistics.median(x) for x in (first, cached, bare))
            table.add_row(backend, f"{f:.2f}", f"{c:.2f}", f"{b:.2f}", f"{f - c:+.2f}")
        Console().print(table)


if __name__ == "__main__":
    main()
