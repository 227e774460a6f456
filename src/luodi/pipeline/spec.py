"""Pipeline: build ops from a JSON spec, run pre-processing into feeds and post-processing into results.

The op registry (registry.py) is a name -> class table filled by the op modules; there is no central schema. This
module imports the classic image and classification ops, so that a Pipeline finds them registered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..tensor import TensorSpec
from . import classify, image  # noqa: F401  (registers the classic ops)
from .registry import build_op, register_op  # noqa: F401  (register_op: luodi.pipeline.spec's name as before)


class Pipeline:
    """Pre-processing for one raw input (or a list of them) -> model feeds, and outputs -> results."""

    def __init__(self, spec: dict[str, Any], inputs: Sequence[TensorSpec]) -> None:
        self.spec = spec
        self.input = spec.get("input") or inputs[0].name
        target = next((i for i in inputs if i.name == self.input), None)
        self._quantised = target if target is not None and target.is_quantised else None
        """The input as an int8-I/O target reads it: pre-processing ends with its integers (float quantised)."""
        self.output = spec.get("output")
        self.pre = [build_op(s) for s in spec.get("pre", [])]
        self.post = [build_op(s) for s in spec.get("post", [])]
        self._local = threading.local()

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        inputs: Sequence[TensorSpec],
        models: Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]] | None = None,
    ) -> Any:
        """The pipeline ``spec`` describes: a ``graph`` (several steps and models) or the classic pre/post lists.

        ``models`` ({name: (inputs, outputs)}, "main" for the primary model) lets a graph be checked
        against the models it calls, as the compiler does before writing a package.
        """
        if not isinstance(spec, dict):
            raise PipelineError(f"a pipeline spec must be a JSON object, got {type(spec).__name__}")
        if "graph" in spec:
            from .graph import GraphPipeline

            return GraphPipeline(spec, models)
        return cls(spec, inputs)

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds spent in pre-processing, the model and post-processing by this thread's last run."""
        return dict(getattr(self._local, "timings", {}))

    def run(self, raw: Any, session: Any, **options: Any) -> Any:
        """pre -> ``session.run`` -> post, timed per stage."""
        t0 = time.perf_counter()
        feeds, context = self.preprocess(raw)
        t1 = time.perf_counter()
        outputs = session.run(feeds)
        t2 = time.perf_counter()
        result = self.postprocess(outputs, context, **options)
        self._local.timings = {"pre": t1 - t0, "model": t2 - t1, "post": time.perf_counter() - t2}
        return result

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
        feed = np.stack(tensors)
        if self._quantised is not None and feed.dtype.kind == "f":
            feed = self._quantised.quantise(feed)  # an integer tensor of the input's dtype passes as it is
        return {self.input: feed}, {"batch": batch}

    def postprocess(self, outputs: dict[str, np.ndarray], context: dict[str, Any], **options: Any) -> Any:
        y: Any = outputs[self.output] if self.output else next(iter(outputs.values()))
        for op in self.post:
            y = op(y, **{k: v for k, v in options.items() if k in getattr(op, "options", ())})
        return y if context.get("batch") else y[0]
