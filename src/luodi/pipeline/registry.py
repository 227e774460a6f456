"""The pipeline op registry: a name -> class table that the op modules fill with ``@register_op``.

Imports nothing of luodi.pipeline, so every op module may register into it without an import cycle. Which op
modules are imported (and so registered) is decided above it: spec.py imports the classic image and classification
ops, graph.py the op package (detection, OCR, audio).
"""

from __future__ import annotations

from typing import Any

from ..errors import PipelineError

_OPS: dict[str, type] = {}


def register_op(cls: type) -> type:
    """Class decorator: make ``cls`` usable in a spec as ``{"op": cls.op, ...}``."""
    _OPS[cls.op] = cls
    return cls


def build_op(step: dict[str, Any]) -> Any:
    """The op object a spec step ``{"op": name, **params}`` describes; PipelineError says what is wrong."""
    if not isinstance(step, dict) or "op" not in step:
        raise PipelineError(f"pipeline step {step!r} must be an object with an 'op' key")
    cls = _OPS.get(step["op"])
    if cls is None:
        raise PipelineError(f"unknown pipeline op '{step['op']}'; known ops: {sorted(_OPS)}")
    params = {k: v for k, v in step.items() if k != "op"}
    try:
        return cls(**params)
    except TypeError as exc:
        raise PipelineError(f"pipeline op '{step['op']}' got bad parameters {params}: {exc}") from exc
