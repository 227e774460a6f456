"""The one batching core: join the feeds of several requests along the batch axis, run once, split back.

Session.run_batch (samples grouped by shape into chunks, padded where the model's batch is fixed) and the
server's batcher (luodi.serve.batcher, which Ray Serve's replicas run too) both join with :func:`join` and split
with :func:`split`; requests join only where :func:`shape_key` agrees. It works on validated numpy feeds and one
run function; it never reaches into an engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError, MissingInputError, ShapeError
from .tensor import TensorSpec

Feeds = dict[str, np.ndarray]
Run = Callable[[Feeds], Feeds]


@dataclass
class Sample:
    index: int
    feeds: Feeds  # with a batch axis; ``rows`` items along it
    rows: int
    unbatched: bool  # given without the batch axis: its outputs lose it again


def shape_key(feeds: Feeds) -> tuple:
    """What must agree for requests to share a batch: every input's name, dtype and shape past the batch axis."""
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feeds.items()))


def rows_of(feeds: Feeds) -> int:
    """The batch size (axis 0) every input of ``feeds`` agrees on; InputError when they disagree or have none."""
    sizes = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"every input must have the same batch size (first dim); got {sorted(map(str, sizes))}")
    return sizes.pop()


def join(parts: Sequence[Feeds], pad_to: int | None = None) -> tuple[Feeds, list[int]]:
    """The feeds of ``parts`` (equal :func:`shape_key`) stacked along axis 0, and each part's rows.

    With ``pad_to`` a batch of fewer rows is padded up to it by repeating its last row (a real input, so no
    NaN or denormal paths in the engine). One part and no padding: its own arrays, not copied.
    """
    rows = [rows_of(p) for p in parts]
    total = sum(rows)
    feeds = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if pad_to is not None and total < pad_to:
            arrays.append(np.repeat(arrays[-1][-1:], pad_to - total, axis=0))
        feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return feeds, rows


def split(outputs: Feeds, rows: Sequence[int]) -> list[Feeds]:
    """Each part's rows of ``outputs`` (views, in order); padding rows past ``sum(rows)`` are dropped.

    ShapeError naming the output when one has no batch axis of at least ``sum(rows)`` to split.
    """
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] < total:
            raise ShapeError(f"output '{name}' of shape {list(value.shape)} has no batch dim of {total} to split")
    offsets = np.cumsum([0, *rows]).tolist()
    return [{k: v[offsets[i] : offsets[i + 1]] for k, v in outputs.items()} for i in range(len(rows))]


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
        groups.setdefault(shape_key(s.feeds), []).append(s)
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
    feeds, rows = join([s.feeds for s in chunk], pad_to)
    got = run(feeds)
    if any(v.ndim == 0 or v.shape[0] != max(sum(rows), pad_to or 0) for v in got.values()):
        return None
    return split(got, rows)


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


def run_samples(
    samples: Sequence[object],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    spec_of: Callable[[str], TensorSpec],
    run: Run,
    reshape: Callable[[dict[str, tuple[int, ...]]], None],
    max_batch: int,
    pad: bool,
) -> list[Feeds]:
    """Session.run_batch's work: check every sample, group by shape into chunks, run each joined, split back.

    ``spec_of`` names an input's spec (an UnknownTensorError for any other name), ``run`` runs checked feeds and
    ``reshape`` tells the engine a padded chunk's shapes. The outputs of each sample come back in input order.
    """
    by_name = {s.name: s for s in inputs}
    fixed = batch_mode(inputs, outputs)
    # A sample has any number of rows up to a fixed batch; only the other axes must match the spec.
    specs = by_name if fixed in (None, 1) else free_batch(inputs)
    items = [as_sample(i, s, inputs) for i, s in enumerate(samples)]
    for item in items:
        missing = [n for n in by_name if n not in item.feeds]
        if missing:
            raise MissingInputError(f"sample {item.index} is missing input(s) {missing}")
        for n, a in item.feeds.items():
            spec_of(n)
            specs[n].check(a)
    limit, pad_to = (max_batch, max_batch if pad else None) if fixed is None else (fixed, fixed)
    if fixed is not None and fixed > 1:
        big = [s.index for s in items if s.rows > fixed]
        if big:
            raise ShapeError(f"samples {big[:10]} have more rows than the model's fixed batch of {fixed}")
    results: list[Feeds] = [{} for _ in items]
    for chunk in plan(items, 1 if fixed == 1 else limit):
        if pad_to is not None:
            reshape({n: (pad_to, *a.shape[1:]) for n, a in chunk[0].feeds.items()})
        split_outputs = run_chunk(chunk, run, None if fixed == 1 else pad_to)
        if split_outputs is None:  # an output without a batch axis to split: one run per sample
            split_outputs = [run(s.feeds) for s in chunk]
        for s, out in zip(chunk, split_outputs):
            results[s.index] = {k: v[0] for k, v in out.items()} if s.unbatched else out
    return results
