"""The child side of the probe (probe.py): ``python -m luodi.backends._probe_child`` reads one artifact from its
stdin, loads it from memory files, runs it once at each shape set and reports JSON lines on its stdout.

Apart from probe.py because it loads through the registry (luodi.backends), which imports the contract, which
imports probe.py: the parent side stays below the contract, the child above the registry.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from ..errors import LuodiError
from . import get_backend, load_engine
from .contract import Artifact, LoadOptions
from .probe import _read_exact, limit_memory


def main() -> None:
    report = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engines print to stdout (C printf too); the reports keep the original descriptor

    def say(**event: Any) -> None:
        report.write(json.dumps(event) + "\n")

    limit_memory()
    stdin = sys.stdin.buffer
    head = json.loads(stdin.readline())
    files = {name: _read_exact(stdin, size) for name, size in head["files"]}
    # in_memory: the engine reads memory files, so a crash leaves no temporary file behind (a backend that loads only
    # from files gets them as files: the parent never probes decrypted files on one, see Backend.load).
    in_memory = get_backend(head["backend"]).in_memory
    artifact = Artifact(head["backend"], head["precision"], files, head["options"], in_memory=in_memory)
    say(stage="loading it")
    try:
        engine = load_engine(artifact, LoadOptions())  # the default threads, as a Session loads it
    except LuodiError as exc:
        say(status="error", during="load", type=type(exc).__name__, error=str(exc))
        return
    for shapes in head["shapes"]:
        say(stage=f"running it at shapes {shapes}")
        try:
            feeds = {s.name: np.ones(shapes.get(s.name, s.concrete(1)), s.np_dtype) for s in engine.inputs}
            outputs = engine.run(feeds)
            # Only that every output came back: the shapes an ONNX file declares may be wrong (ddddocr declares
            # [1, seqlen] for a [T, 1, C] output), and verification compares the shapes with the reference's.
            missing = [spec.name for spec in engine.outputs if spec.name not in outputs]
            if missing:
                raise ValueError(f"no output(s) {missing}")
        except Exception as exc:  # reported; the parent refuses the file
            say(status="error", during="run", error=f"{type(exc).__name__}: {exc}")
            return
    engine.close()
    say(status="ok")


if __name__ == "__main__":
    main()
