"""How long ``import luodi`` takes, from ``python -X importtime``: the median over N fresh interpreters.

Each run starts a new interpreter with ``-X importtime -c "import luodi"`` and reads the cumulative
microseconds of the ``luodi`` line (everything luodi imports, numpy included). Also reported: numpy's
own cumulative time in the same runs, so the figure can be read as "numpy + luodi's own part", and
the third-party top-level modules that ``import luodi`` loaded.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/importtime.py [-n 15]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def one_run() -> tuple[int, int]:
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import luodi"], capture_output=True, text=True, check=True
    ).stderr
    cumulative = {}
    for m in _LINE.finditer(err):
        cumulative.setdefault(m.group(4), int(m.group(2)))
    return cumulative["luodi"], cumulative.get("numpy", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="interpreters to start (default 15)")
    n = ap.parse_args().n
    runs = [one_run() for _ in range(n)]
    luodi_ms = statistics.median(r[0] for r in runs) / 1000
    numpy_ms = statistics.median(r[1] for r in runs) / 1000
    mods = subprocess.run(
        [sys.executable, "-c", "import sys, luodi; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    heavy = [
        m for m in ("onnx", "onnxruntime", "torch", "openvino", "ncnn", "MNN", "fastapi", "ray", "PIL") if m in mods
    ]
    print(f"import luodi: median cumulative {luodi_ms:.1f} ms over {n} runs (numpy alone: {numpy_ms:.1f} ms)")
    print(f"optional packages imported by `import luodi`: {heavy or 'none'}")


if __name__ == "__main__":
    main()
