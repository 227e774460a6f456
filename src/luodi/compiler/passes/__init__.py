"""Graph passes the compiler runs on the canonical ONNX graph before any backend sees it.

Each pass is one small class (``name``, ``run(model, ctx) -> model``) in its own module; a pass must
never change what the graph computes beyond float rounding (tests check 1e-5 relative).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CompileError
from .base import Pass, PassContext  # noqa: F401  (re-exported: luodi.compiler.passes.Pass as before)


@dataclass
class PassRecord:
    """One pass as it ran: node and initializer counts before/after, time, and what it did."""

    name: str
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    ms: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _registry() -> dict[str, type[Pass]]:
    from .batchnorm import FoldBatchNorm
    from .cleanup import EliminateDeadNodes, EliminateIdentity
    from .constant_folding import FoldConstants
    from .normalize import FoldInputNormalization
    from .shape_inference import InferShapes

    classes = [InferShapes, FoldConstants, EliminateIdentity, FoldBatchNorm, FoldInputNormalization, EliminateDeadNodes]
    return {c.name: c for c in classes}


#: The passes ``luodi.compile`` runs unless told otherwise, in this order.
DEFAULT = (
    "infer-shapes",
    "fold-constants",
    "eliminate-identity",
    "fold-batchnorm",
    "fold-input-normalization",
    "eliminate-dead-nodes",
    "infer-shapes",
)


def available() -> dict[str, str]:
    """Every pass name -> its one-line summary."""
    return {name: cls.summary for name, cls in _registry().items()}


def resolve(passes: str | Sequence[str] | None) -> list[str]:
    """``"default"`` -> DEFAULT; ``None``/``"none"``/``[]`` -> no passes; a list is checked name by name."""
    if passes is None or passes == "none":
        return []
    if passes == "default":
        return list(DEFAULT)
    names = [passes] if isinstance(passes, str) else list(passes)
    known = _registry()
    for name in names:
        if name not in known:
            raise CompileError(f"unknown graph pass '{name}'; known passes: {', '.join(known)}")
    return names


def run_passes(
    model: Any, passes: str | Sequence[str] | None = "default", pipeline: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any] | None, list[PassRecord]]:
    """Run ``passes`` on a copy of ``model``; return the new model, the (maybe rewritten) pipeline, the records."""
    import onnx

    names = resolve(passes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ctx = PassContext(pipeline=pipeline)
    records = []
    registry = _registry()
    for name in names:
        before = (len(out.graph.node), len(out.graph.initializer))
        ctx.notes = []
        t0 = time.perf_counter()
        out = registry[name]().run(out, ctx)
        ms = (time.perf_counter() - t0) * 1e3
        records.append(
            PassRecord(name, before[0], len(out.graph.node), before[1], len(out.graph.initializer), ms, ctx.notes)
        )
    return out, ctx.pipeline, records


__all__ = ["DEFAULT", "Pass", "PassContext", "PassRecord", "available", "resolve", "run_passes"]
