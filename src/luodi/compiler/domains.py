"""The values each input of a model takes, for the inputs verification generates: pixels 0..255 where the
pipeline feeds pixels, an index input within what it indexes, a mask 0..1, else the samples' range.

It reads the graph and the pipeline spec; it never runs the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tensor import TensorSpec
from ..verify import Domain

# Operators an index passes through unchanged in value on its way to a Gather (shape changes only, or a cast).
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}
_GATHERS = {"Gather", "GatherElements"}


def _dims(model: Any) -> dict[str, list[int | None]]:
    """Known shapes of the graph's tensors: initializers, inputs and inferred value_info."""
    dims: dict[str, list[int | None]] = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.name in dims or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return dims


def _index_bound(model: Any, name: str) -> int | None:
    """The smallest size an integer input indexes into: follow it through casts and reshapes to each Gather that
    takes it as indices, and read that Gather's data size on its axis. None when it reaches none."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i, t in enumerate(node.input):
            consumers.setdefault(t, []).append((node, i))
    dims = _dims(model)
    bound: int | None = None
    seen, todo = {name}, [name]
    while todo:
        tensor = todo.pop()
        for node, i in consumers.get(tensor, []):
            if node.op_type in _PASS_THROUGH and i == 0:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
            elif node.op_type in _GATHERS and i == 1:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                data = dims.get(node.input[0])
                if data and -len(data) <= axis < len(data) and data[axis]:
                    size = int(data[axis])  # type: ignore[arg-type]
                    bound = size if bound is None else min(bound, size)
    return bound


def _observed(feeds: Sequence[Mapping[str, np.ndarray]], name: str) -> tuple[float, float] | None:
    values = [np.asarray(f[name]) for f in feeds if name in f and np.asarray(f[name]).size]
    if not values:
        return None
    lo = min(float(np.nanmin(v)) for v in values)
    hi = max(float(np.nanmax(v)) for v in values)
    # lo == hi is a constant input (a sample rate, a zero state): generated inputs keep it
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def input_domains(
    model: Any,
    specs: Sequence[TensorSpec],
    pipeline: Mapping[str, Any] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
) -> dict[str, Domain]:
    """Per input the Domain generated inputs are drawn from (inputs with none keep the defaults: normal floats,
    integers 0..9, bools 0/1)."""
    from ..package.schema import FOLDED_NORMALIZATION

    folded = (pipeline or {}).get(FOLDED_NORMALIZATION) or {}
    out: dict[str, Domain] = {}
    for s in specs:
        kind = s.np_dtype.kind
        seen = _observed(feeds, s.name)
        if kind == "f":
            if folded.get("input") == s.name:
                out[s.name] = Domain("uniform", 0.0, 255.0)  # the normalisation is in the graph: it takes pixels
            elif seen is not None:
                out[s.name] = Domain("uniform", *seen)
        elif kind in "iu":
            bound = _index_bound(model, s.name)
            if bound is not None:
                out[s.name] = Domain("index", 0.0, float(max(bound - 1, 0)))
            elif "mask" in s.name.lower():
                out[s.name] = Domain("index", 0.0, 1.0)
            elif seen is not None:
                out[s.name] = Domain("index", float(int(seen[0])), float(int(seen[1])))
    return out
