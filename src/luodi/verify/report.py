"""`luodi verify`: run a package's targets on a dataset and compare each with another target (the float
reference by default): max abs error, cosine and SNR per output, top-1 agreement over the set.

It runs targets through the backends' load/run only; it never changes a package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import CompileOptions, LoadOptions, get_backend
from ..errors import LuodiError
from . import compare_arrays

# The reference evaluator runs EfficientNet-Lite0 at about a second an image; past this many samples the canonical
# float graph runs on onnxruntime fp32 instead (compile-time verification pins it to the evaluator within 1e-4).
REFERENCE_EVALUATOR_MAX = 8


@dataclass(frozen=True)
class OutputReport:
    target: str
    output: str
    max_abs: float
    cosine: float
    snr_db: float
    agreement: float | None


def _label(t: dict[str, Any]) -> str:
    return f"{t['backend']}:{t['precision']}"


def _run(package: Any, target: dict[str, Any], feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    backend, artifact = get_backend(target["backend"]), package.artifact(target)
    backend.probe(artifact, package.representative_shapes)  # a malformed engine file must not kill `verify`
    engine = backend.load(artifact, LoadOptions())
    try:
        return [engine.run(f) for f in feeds]
    finally:
        engine.close()


def reference_outputs(package: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[list[dict[str, np.ndarray]], str]:
    """The canonical float graph's outputs and what ran it."""
    if len(feeds) <= REFERENCE_EVALUATOR_MAX:
        backend, ran = get_backend("reference"), "reference evaluator"
    else:
        backend, ran = get_backend("onnxruntime"), "canonical graph on onnxruntime fp32"
    engine = backend.load(backend.compile(package.model(), CompileOptions()), LoadOptions())
    try:
        return [engine.run(f) for f in feeds], ran
    finally:
        engine.close()


def verify_package(
    package: Any,
    feeds: list[dict[str, np.ndarray]],
    targets: list[dict[str, Any]] | None = None,
    against: str = "reference",
) -> tuple[list[OutputReport], str]:
    """Per target and output, the error against ``against`` (a target label or "reference") over ``feeds``."""
    from ..quant.sensitivity import snr_db

    if against == "reference":
        base, ran = reference_outputs(package, feeds)
    else:
        backend, _, precision = against.partition(":")
        base, ran = _run(package, package.find_target(backend, precision or None), feeds), against
    reports = []
    for t in targets if targets is not None else package.targets:
        if _label(t) == against or (t["backend"] == "reference" and against == "reference"):
            continue
        try:
            got = _run(package, t, feeds)
        except LuodiError as exc:
            reports.append(OutputReport(_label(t), f"failed: {exc}", float("inf"), 0.0, float("-inf"), None))
            continue
        for name in base[0]:
            ref = np.concatenate([b[name] for b in base])
            out = np.concatenate([g[name] for g in got])
            c = compare_arrays(name, ref, out)
            agree = float((ref.argmax(1) == out.argmax(1)).mean()) if ref.ndim == 2 and ref.shape[1] > 1 else None
            reports.append(OutputReport(_label(t), name, c.max_abs, c.cosine, snr_db(ref, out), agree))
    return reports, ran
