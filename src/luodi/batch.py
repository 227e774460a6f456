"""Batched runs for Session.run_batch: group samples by shape, stack them into chunks, run, split back in order.

It works on validated numpy feeds and one run function; it never reaches into an engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .tensor import TensorSpec

Feeds = dict[str, np.ndarray]
Run = Callable[[Feeds], Feeds]


@dataclass
class Sample:
    index: int
    feeds: Feeds  # with a batch axis; ``rows`` items along it
    rows: int
    unbatched: bool  # given without the batch axis: its outputs lose it again


def batch_mode(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> int | None:
    """None when the model's batch (axis 0 of every input and output) is dynamic; else its fixed size (1: none)."""
    firsts = [s.shape[0] if s.shape else 1 for s in (*inputs, *outputs)]
    if all(not isinstance(d, int) for d in firsts):
        return None
    fixed = {d for d in firsts if isinstance(d, int)}
    return fixed.pop() if len(fixed) == 1 and all(isinstance(d, int) for d in firsts) else 1


def free_batch(inputs: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    """The input specs with axis 0 free, to check the samples that run_batch pads up to a fixed batch."""
    return {s.name: dataclasses.replace(s, shape=("batch", *s.shape[1:])) for s in inputs}


def plan(samples: Sequence[Sample], max_batch: int) -> list[list[Sample]]:
    """Chunks of samples with equal per-item shapes and at most ``max_batch`` rows each (a bigger sample: alone)."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(s.feeds.items()))
        groups.setdefault(key, []).append(s)
    chunks = []
    for members in groups.values():
        chunk: list[Sample] = []
        rows = 0
        for s in members:
            if chunk and rows + s.rows > max_batch:
                chunks.append(chunk)
                chunk, rows = [], 0
            chunk.append(s)
            rows += s.rows
        if chunk:
            chunks.append(chunk)
    return chunks


def run_chunk(chunk: list[Sample], run: Run, pad_to: int | None) -> list[Feeds] | None:
    """Each sample's outputs from one stacked run; None when an output has no batch axis to split."""
    rows = [s.rows for s in chunk]
    total = sum(rows)
    feeds = {}
    for name in chunk[0].feeds:
        parts = [s.feeds[name] for s in chunk]
        if pad_to is not None and total < pad_to:  # repeat the last item: a real input, so no NaN/denormal paths
            parts.append(np.repeat(parts[-1][-1:], pad_to - total, axis=0))
        feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    got = run(feeds)
    if any(v.ndim == 0 or v.shape[0] != max(total, pad_to or 0) for v in got.values()):
        return None
    offsets = np.cumsum([0, *rows])
    return [{k: v[offsets[i] : offsets[i + 1]] for k, v in got.items()} for i in range(len(chunk))]


def as_sample(index: int, sample: object, inputs: Sequence[TensorSpec]) -> Sample:
    """Sample ``index`` as feeds with a batch axis: a feed dict, or an array when the model has one input."""
    if isinstance(sample, dict):
        feeds = dict(sample)
    elif len(inputs) == 1:
        feeds = {inputs[0].name: sample}
    else:
        names = [s.name for s in inputs]
        raise InputError(f"sample {index} is a {type(sample).__name__}; this model has inputs {names}: give a dict")
    specs = {s.name: s for s in inputs}
    arrays = {}
    for name, value in feeds.items():
        spec = specs.get(name)
        arrays[name] = value if spec is None else spec.as_array(value)
    unbatched = all(
        n in specs and isinstance(a, np.ndarray) and len(specs[n].shape) >= 1 and a.ndim == len(specs[n].shape) - 1
        for n, a in arrays.items()
    )
    if unbatched:
        arrays = {n: a[np.newaxis] for n, a in arrays.items()}
    rows = {a.shape[0] if getattr(a, "ndim", 0) else 1 for a in arrays.values()} or {1}
    if len(rows) != 1:
        raise InputError(f"sample {index}: its inputs disagree on the batch size (axis 0): {sorted(rows)}")
    return Sample(index, arrays, rows.pop(), unbatched)
