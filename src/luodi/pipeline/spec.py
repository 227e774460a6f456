"""Pipeline: build ops from a JSON spec, run pre-processing into feeds and post-processing into results.

The op registry is a name -> class table filled by the op modules; there is no central schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..tensor import TensorSpec

_OPS: dict[str, type] = {}


def register_op(cls: type) -> type:
    """Class decorator: make ``cls`` usable in a spec as ``{"op": cls.op, ...}``."""
    _OPS[cls.op] = cls
    return cls


def _build(step: dict[str, Any]) -> Any:
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


class Pipeline:
    """Pre-processing for one raw input (or a list of them) -> model feeds, and outputs -> results."""

    def __init__(self, spec: dict[str, Any], inputs: Sequence[TensorSpec]) -> None:
        from . import classify, image  # noqa: F401  (registers the ops)

        self.spec = spec
        self.input = spec.get("input") or inputs[0].name
        self.output = spec.get("output")
        self.pre = [_build(s) for s in spec.get("pre", [])]
        self.post = [_build(s) for s in spec.get("post", [])]

    @classmethod
    def from_spec(cls, spec: dict[str, Any], inputs: Sequence[TensorSpec]) -> Pipeline:
        return cls(spec, inputs)

    def preprocess(self, raw: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Feeds for the model and a context for postprocess (whether ``raw`` was a batch)."""
        batch = isinstance(raw, (list, tuple))
        items = list(raw) if batch else [raw]
        if not items:
            raise PipelineError("predict() got an empty list; give at least one input")
        tensors = []
        for item in items:
            x = item
            for op in self.pre:
                x = op(x)
            tensors.append(x)
        return {self.input: np.stack(tensors)}, {"batch": batch}

    def postprocess(self, outputs: dict[str, np.ndarray], context: dict[str, Any], **options: Any) -> Any:
        y: Any = outputs[self.output] if self.output else next(iter(outputs.values()))
        for op in self.post:
            y = op(y, **{k: v for k, v in options.items() if k in getattr(op, "options", ())})
        return y if context.get("batch") else y[0]
