"""Representative input shapes: the concrete shape sets a model is converted, verified, warmed up and timed at.

It parses what the user gave (``--input-shape``, sample feeds), checks it against the model's inputs and chooses
the sets: the primary one first, then one giving every dynamic axis a second size. It runs nothing.

Where a free axis has no size from the samples, the given shapes or the model's own examples, a size is chosen:
an axis 0 (the batch) is 1, the height and width of an image input (rank 4 with 1, 3 or 4 channels) are 224,
any other axis 32. A model that cannot run at the chosen sizes is refused by the compiler's reference run, with
the sizes it tried and how to give others; a spatial axis is never silently 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.base import Shapes
from ..errors import InputError, LuodiError
from ..tensor import TensorSpec

Range = tuple[int, int]
GivenDim = int | Range
"""One axis as given: a size, or a range ``(low, high)`` of sizes that keeps the axis dynamic."""

IMAGE_SIZE = 224
OTHER_SIZE = 32
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass
class ShapePlan:
    """The shape sets of one model, the primary first, and the ranges given for its dynamic axes."""

    sets: list[Shapes]
    ranges: dict[str, dict[int, Range]] = field(default_factory=dict)
    generated: list[bool] = field(default_factory=list)
    """Per set: True when luodi chose it (a second size it invented), False when samples or the user gave it."""
    notes: list[str] = field(default_factory=list)
    fallbacks: list[Shapes] = field(default_factory=list)
    """One set per dynamic symbol, each changing that symbol alone: tried when the set changing them all at once
    cannot run (an OCR recogniser runs any width but only its one height), so every axis that can take a second
    size still gets one."""

    @property
    def primary(self) -> Shapes:
        return self.sets[0]

    def drop(self, index: int, why: str) -> None:
        """Forget set ``index`` (a generated one the reference cannot run), saying why."""
        self.notes.append(f"{_describe(self.sets[index])} was not used: {why}")
        del self.sets[index]
        del self.generated[index]

    def to_manifest(self, domains: Mapping[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "representative": [{n: list(s) for n, s in shape_set.items()} for shape_set in self.sets]
        }
        if self.ranges:
            out["ranges"] = {n: {str(a): list(r) for a, r in axes.items()} for n, axes in self.ranges.items()}
        if domains:
            out["domains"] = {n: d.to_dict() for n, d in domains.items()}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _describe(shapes: Shapes) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def parse_dims(value: Any, where: str) -> list[GivenDim]:
    """``"1x3x32..640x32..640"`` or ``[1, 3, (32, 640), (32, 640)]`` -> [1, 3, (32, 640), (32, 640)]."""
    if isinstance(value, str):
        dims: list[GivenDim] = []
        for part in value.lower().replace(",", "x").split("x"):
            part = part.strip()
            m = _RANGE.match(part)
            if m:
                dims.append((int(m.group(1)), int(m.group(2))))
            elif part.isdigit():
                dims.append(int(part))
            else:
                raise InputError(
                    f"{where}: '{value}' is not a shape; write sizes separated by x, a dynamic axis as LOW..HIGH, "
                    "e.g. 1x3x224x224 or 1x3x32..640x32..640"
                )
        value = dims
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: a shape is a string like 1x3x224x224 or a list of sizes, not {value!r:.60}")
    out: list[GivenDim] = []
    for d in value:
        if isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(x, (int, np.integer)) for x in d):
            lo, hi = int(d[0]), int(d[1])
            if not 1 <= lo <= hi:
                raise InputError(f"{where}: the range {lo}..{hi} must run from a size of at least 1 up")
            out.append((lo, hi))
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1:
            out.append(int(d))
        else:
            raise InputError(f"{where}: {d!r:.40} is not a size (a positive integer) or a (low, high) range")
    return out


def parse_input_shapes(given: Mapping[str, Any] | None, specs: Sequence[TensorSpec]) -> dict[str, list[GivenDim]]:
    """Check user-given shapes against the model's inputs: known names, the right rank, fixed axes kept."""
    if not given:
        return {}
    by_name = {s.name: s for s in specs}
    out: dict[str, list[GivenDim]] = {}
    for name, value in given.items():
        if name not in by_name:
            raise InputError(f"the model has no input '{name}' to give a shape for; its inputs are {list(by_name)}")
        spec = by_name[name]
        dims = parse_dims(value, f"input shape of '{name}'")
        if len(dims) != len(spec.shape):
            raise InputError(
                f"input '{name}' has {len(spec.shape)} axes {spec.shape_str()}, the shape given has {len(dims)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, dims)):
            if isinstance(want, int) and got != want:
                raise InputError(
                    f"axis {axis} of input '{name}' is fixed at {want} in the model {spec.shape_str()}; "
                    f"it cannot be {got if isinstance(got, int) else f'{got[0]}..{got[1]}'}"
                )
        out[name] = dims
    return out


def check_samples(samples: Sequence[Mapping[str, Any]], specs: Sequence[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """Sample feeds as arrays, each with every input (no other), of its dtype and a shape its spec allows."""
    names = [s.name for s in specs]
    out = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise InputError(f"sample {i} is a {type(sample).__name__}; a sample maps each input name to an array")
        missing = [n for n in names if n not in sample]
        extra = [n for n in sample if n not in names]
        if missing or extra:
            raise InputError(
                f"sample {i} must hold exactly the model's inputs {names}"
                + (f"; it lacks {missing}" if missing else "")
                + (f"; it has {extra}, which the model does not take" if extra else "")
            )
        feeds = {}
        for spec in specs:
            arr = np.asarray(sample[spec.name])
            try:
                spec.check(arr)  # a DTypeError / ShapeError naming the input, expected and got
            except LuodiError as exc:
                raise InputError(f"sample {i}: {exc}") from None
            feeds[spec.name] = arr
        out.append(feeds)
    return out


def _default_size(spec: TensorSpec, axis: int) -> int:
    if axis == 0:
        return 1
    shape = spec.shape
    if len(shape) == 4 and spec.np_dtype.kind == "f":
        if shape[1] in (1, 3, 4) and axis in (2, 3):  # NCHW image
            return IMAGE_SIZE
        if shape[3] in (1, 3, 4) and axis in (1, 2):  # NHWC image
            return IMAGE_SIZE
    return OTHER_SIZE


def second_size(size: int, given: GivenDim | None = None, batch: bool = False) -> int | None:
    """Another size for a dynamic axis at ``size``: in the given range; else a batch (axis 0) 2 at 1 and 1 above;
    else, from 64 up, about half on a stride of 32 (cheaper for the reference, and a detector's stride kept); below,
    twice the size (a small input may be the smallest the model takes: half of it can leave a pooling nothing to
    pool). None when a range allows no other size."""
    if isinstance(given, tuple):
        lo, hi = given
        return lo if lo != size else (hi if hi != size else None)
    if batch:
        return 2 if size == 1 else 1
    if size >= 64:
        return (size // 2) // 32 * 32 if size % 32 == 0 else size // 2
    return size * 2


def _middle(lo: int, hi: int) -> int:
    step = math.gcd(lo, hi)  # 32..640 keeps a stride of 32: 320
    return lo + ((hi - lo) // 2) // step * step


def plan_shapes(
    specs: Sequence[TensorSpec],
    *,
    given: Mapping[str, list[GivenDim]] | None = None,
    samples: Sequence[Mapping[str, np.ndarray]] = (),
    examples: Sequence[Mapping[str, np.ndarray]] = (),
) -> ShapePlan:
    """The shape sets for a model with inputs ``specs``: those of the samples (else of the given shapes, else of
    the model's own examples, else chosen), then one more giving every dynamic axis a second size."""
    given = dict(given or {})
    sizes: dict[str, int] = {}  # a free axis's symbol -> its primary size (axes sharing a symbol share a size)

    def size_from(feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        for f in feeds[:1]:
            for s in specs:
                if s.name in f:
                    for d, n in zip(s.shape, np.shape(f[s.name])):
                        if not isinstance(d, int):
                            sizes.setdefault(d, int(n))

    size_from(samples)
    for s in specs:  # given sizes and ranges: a sample's size wins, the middle of a range otherwise
        for d, g in zip(s.shape, given.get(s.name, ())):
            if not isinstance(d, int):
                sizes.setdefault(d, g if isinstance(g, int) else _middle(*g))
    size_from(examples)
    ranges: dict[str, dict[int, Range]] = {}
    primary: Shapes = {}
    for s in specs:
        dims = []
        for axis, d in enumerate(s.shape):
            if isinstance(d, int):
                dims.append(d)
                continue
            g = given.get(s.name, [None] * len(s.shape))[axis]
            if isinstance(g, tuple):
                ranges.setdefault(s.name, {})[axis] = g
                if not g[0] <= sizes.get(d, g[0]) <= g[1]:
                    raise InputError(
                        f"axis {axis} of input '{s.name}' is {sizes[d]} in the samples, outside the range "
                        f"{g[0]}..{g[1]} given for it"
                    )
            dims.append(sizes.setdefault(d, _default_size(s, axis)))
        primary[s.name] = tuple(dims)

    sets = [primary]
    for f in samples[1:]:
        other = {n: tuple(int(x) for x in np.shape(a)) for n, a in f.items()}
        if other not in sets:
            sets.append(other)
    generated = [False] * len(sets)
    # Every dynamic axis needs a second size somewhere; one more set gives it to all axes still at one size.
    seconds: dict[str, int] = {}
    for s in specs:
        for axis, d in enumerate(s.shape):
            if isinstance(d, int) or d in seconds:
                continue
            if len({shape_set[s.name][axis] for shape_set in sets}) > 1:
                continue
            # A bare size on a dynamic axis fixes the representative size only: the axis still gets a second one.
            g = given.get(s.name, [None] * len(s.shape))[axis]
            other_size = second_size(primary[s.name][axis], g, batch=axis == 0)
            if other_size is not None:
                seconds[d] = other_size
    if seconds:
        extra = {
            s.name: tuple(seconds.get(d, n) if not isinstance(d, int) else n for d, n in zip(s.shape, primary[s.name]))
            for s in specs
        }
        sets.append(extra)
        generated.append(True)
    fallbacks = []
    if len(seconds) > 1:
        for symbol, other_size in seconds.items():
            fallbacks.append(
                {
                    s.name: tuple(other_size if d == symbol else n for d, n in zip(s.shape, primary[s.name]))
                    for s in specs
                }
            )
    return ShapePlan(sets, ranges, generated, fallbacks=fallbacks)


def describe(shapes: Shapes) -> str:
    """``images=1x3x320x320, mask=1x16``: a shape set in one line, for messages."""
    return _describe(shapes)
