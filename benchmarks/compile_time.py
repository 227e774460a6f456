"""How long `luodi.compile` takes on the zoo models, every engine at once, with verification on.

For each zoo model it runs one compile for every available target of onnxruntime, openvino, ncnn, mnn and
reference (what a user gets from `luodi compile zoo:NAME -t ... -t ...`) and prints the wall time, the
targets written and any that failed, and (where luodi reports its steps) the seconds spent running the
reference, converting and verifying. Each model is compiled ``--repeat`` times; the table shows the median.
It reports, it does not assert.

    .venv/bin/python benchmarks/compile_time.py                   # all zoo models, every engine here
    .venv/bin/python benchmarks/compile_time.py -m zoo:silero-vad -t onnxruntime -t reference
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import luodi
from luodi.backends import get_backend
from luodi.errors import LuodiError

try:
    from luodi.progress import Progress
except ImportError:  # luodi before luodi.progress: no phases, the total only
    Progress = object  # type: ignore[assignment,misc]

ENGINES = ("onnxruntime", "openvino", "ncnn", "mnn", "reference")
MODELS = ("zoo:efficientnet-lite0", "zoo:yolov8n-nudenet", "zoo:pp-ocrv4", "zoo:silero-vad")


def available(engines: tuple[str, ...]) -> list[str]:
    return [e for e in engines if get_backend(e).available().ok]


class Phases(Progress):
    """A silent Progress that adds up the seconds of each kind of step: the reference, converting, verifying."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Any]:
        kind = "reference" if description.startswith("running the reference") else description.split()[0]
        start = time.perf_counter()
        with super().step(description, total) as handle:
            yield handle
        self.seconds[kind] += time.perf_counter() - start


def compile_once(model: str, targets: list[str], out: Path) -> tuple[float, str]:
    """Seconds for one compile, and what it wrote (targets by status) or why it failed."""
    # luodi before the progress parameter: the total only
    phases = Phases() if "progress" in inspect.signature(luodi.compile).parameters else None
    extra = {"progress": phases} if phases is not None else {}
    start = time.perf_counter()
    try:
        pkg = luodi.compile(model, out, targets, **extra)
    except LuodiError as exc:
        return time.perf_counter() - start, f"error: {str(exc).splitlines()[0][:100]}"
    seconds = time.perf_counter() - start
    failed = [f"{t['backend']}" for t in pkg.targets if t.get("status") == "failed"]
    failed += [f"{t['backend']}" for t in pkg.targets if t.get("verification", {}).get("passed") is False]
    good = len(pkg.targets) - len(set(failed))
    result = f"{good} ok" + (f", failed: {', '.join(sorted(set(failed)))}" if failed else "")
    if phases is not None:
        result += "; " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(phases.seconds.items()))
    return seconds, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", help="a model to compile (repeat); default: the zoo's four")
    ap.add_argument("-t", "--target", action="append", help="an engine (repeat); default: every one available")
    ap.add_argument("--repeat", type=int, default=1, help="compiles per model; the median is shown")
    args = ap.parse_args()
    targets = args.target or available(ENGINES)
    table = Table(title=f"compile time, verified, targets: {', '.join(targets)}")
    for col in ("model", "seconds", "runs", "result"):
        table.add_column(col, justify="right" if col in ("seconds", "runs") else "left")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model or MODELS:
            times, result = [], ""
            for i in range(args.repeat):
                seconds, result = compile_once(model, targets, Path(tmp) / f"m{i}.luodi")
                times.append(seconds)
            table.add_row(model, f"{statistics.median(times):.1f}", str(args.repeat), result)
            Console(width=250).print(f"{model}: {statistics.median(times):.1f} s ({result})", soft_wrap=True)
    Console().print(table)


if __name__ == "__main__":
    main()
