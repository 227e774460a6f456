"""Compare a target's outputs with the float reference: shape first, integers exactly, NaN/Inf as a result.

Pure numpy on output dictionaries; it runs nothing itself except through a Session or Engine. Every number it
returns is finite or None, so a record always encodes as strict JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..tensor import TensorSpec

# Allowed error per precision, relative to the largest reference magnitude (at least 1).
# fp32 engines reorder float sums, so they differ from the reference in the last bits only;
# anything looser for fp32 would hide a silent bf16/fp16 downcast (~1e-2 on logits).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel_max_abs": 1e-4, "min_cosine": 0.99999},
    "fp16": {"rel_max_abs": 1e-2, "min_cosine": 0.999},
    "bf16": {"rel_max_abs": 5e-2, "min_cosine": 0.995},
    "int8": {"rel_max_abs": 2e-1, "min_cosine": 0.98},
}

# The tightest absolute error any precision allows (fp32's 1e-4 x max(1, |ref|)).
NOISE_FLOOR = TOLERANCES["fp32"]["rel_max_abs"]


@dataclass(frozen=True)
class OutputComparison:
    """One output's worst case over the samples. ``mismatch`` says why it cannot pass at any tolerance (a shape,
    an integer that differs, NaN/Inf where the other side has a number); numbers are None where not computable."""

    name: str
    max_abs: float | None
    mean_abs: float | None
    cosine: float | None
    ref_max: float | None
    mismatch: str = ""
    exact: bool = False
    """An integer or bool output: at fp32 it must equal the reference (an index one off is simply wrong); reduced
    precisions may flip an argmax near a tie, so they are judged by the tolerance like floats."""

    def passes(self, precision: str) -> bool:
        if self.mismatch or self.max_abs is None or self.cosine is None:
            return False
        if self.exact and precision == "fp32":
            return self.max_abs == 0
        tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
        return self.max_abs <= tol["rel_max_abs"] * max(1.0, self.ref_max or 0.0) and self.cosine >= tol["min_cosine"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "name"}
        for key in ("mismatch", "exact"):
            if not d[key]:
                del d[key]  # a float output's record keeps the four numbers only
        return d


def _shape(a: np.ndarray) -> str:
    return "(" + ", ".join(str(d) for d in a.shape) + ")"


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _special_mismatch(ref: np.ndarray, got: np.ndarray) -> str:
    """NaN and ±Inf must sit at the same positions on both sides (a result, not an error)."""
    for what, r, g in (
        ("NaN", np.isnan(ref), np.isnan(got)),
        ("+Inf", np.isposinf(ref), np.isposinf(got)),
        ("-Inf", np.isneginf(ref), np.isneginf(got)),
    ):
        only_got, only_ref = int(np.count_nonzero(g & ~r)), int(np.count_nonzero(r & ~g))
        if only_got or only_ref:
            parts = []
            if only_got:
                parts.append(f"{what} at {only_got} position(s) where the reference has another value")
            if only_ref:
                parts.append(f"the reference has {what} at {only_ref} position(s) where the target does not")
            return "; ".join(parts)
    return ""


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray) -> OutputComparison:
    """Shapes first (a mismatch names both), then integer/bool outputs exactly, then float error on the finite
    positions, with NaN/Inf required at the same positions."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return OutputComparison(
            name, None, None, None, None, f"shape {_shape(got)} where the reference has {_shape(ref)}"
        )
    exact = ref.dtype.kind in "biu"
    if got.dtype.kind not in "biuf" or ref.dtype.kind not in "biuf":
        return OutputComparison(name, None, None, None, None, f"dtype {got.dtype} cannot be compared with {ref.dtype}")
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    mismatch = _special_mismatch(r, g)
    both = np.isfinite(r) & np.isfinite(g)
    r, g = r[both], g[both]
    diff = np.abs(r - g)
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    ref_max = np.abs(r).max(initial=0.0)
    if (nr == 0 and ng == 0) or ref_max <= NOISE_FLOOR:
        # Every reference value is below the tightest error bound (a detector's map on a blank input): there is no
        # direction to compare, rounding alone moves the cosine; the max abs error against the bound decides.
        cos = 1.0
    elif nr == 0 or ng == 0:
        cos = 0.0
    else:
        cos = float(np.clip(np.dot(r, g) / (nr * ng), -1.0, 1.0))
    return OutputComparison(
        name,
        _finite(diff.max(initial=0.0)),
        _finite(diff.mean()) if diff.size else 0.0,
        _finite(cos),
        _finite(ref_max),
        mismatch,
        exact,
    )


def _worse(a: float | None, b: float | None, pick: Any) -> float | None:
    return None if a is None or b is None else pick(a, b)


def compare(
    reference: Sequence[Mapping[str, np.ndarray]], target: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, OutputComparison]:
    """Per output, the worst case over all samples (largest error, smallest cosine, the first mismatch)."""
    worst: dict[str, OutputComparison] = {}
    for i, (ref_out, got_out) in enumerate(zip(reference, target)):
        for name, ref in ref_out.items():
            if name not in got_out:
                c = OutputComparison(name, None, None, None, None, "the target returned no such output")
            else:
                c = compare_arrays(name, np.asarray(ref), np.asarray(got_out[name]))
            if c.mismatch and len(reference) > 1:
                c = OutputComparison(
                    c.name, c.max_abs, c.mean_abs, c.cosine, c.ref_max, f"sample {i}: {c.mismatch}", c.exact
                )
            w = worst.get(name)
            if w is None:
                worst[name] = c
                continue
            worst[name] = OutputComparison(
                name,
                _worse(w.max_abs, c.max_abs, max),
                _worse(w.mean_abs, c.mean_abs, max),
                _worse(w.cosine, c.cosine, min),
                _worse(w.ref_max, c.ref_max, max),
                w.mismatch or c.mismatch,
                w.exact or c.exact,
            )
    return worst


def failure_reason(comparisons: Mapping[str, OutputComparison], precision: str) -> str:
    """One line saying why a target fails (the first failing output), "" when it passes."""
    for name, c in comparisons.items():
        if c.passes(precision):
            continue
        if c.mismatch:
            return f"output '{name}': {c.mismatch}"
        if c.max_abs is None or c.cosine is None:
            return f"output '{name}': its error is not a finite number"
        if c.exact and precision == "fp32":
            return f"integer output '{name}' differs from the reference (by up to {c.max_abs:.6g}); it must be equal"
        tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
        return (
            f"output '{name}' is outside the {precision} tolerance (max abs error {c.max_abs:.3g}, allowed "
            f"{tol['rel_max_abs'] * max(1.0, c.ref_max or 0.0):.3g}; cosine {c.cosine:.6f})"
        )
    return ""


def verification_record(
    precision: str,
    comparisons: dict[str, OutputComparison],
    samples: int,
    against: str = "reference",
    shapes: Sequence[Mapping[str, Sequence[int]]] = (),
) -> dict[str, Any]:
    """The manifest's record of one target's verification; ``shapes`` are the input shape sets it ran at."""
    record: dict[str, Any] = {
        "against": against,
        "samples": samples,
        "tolerance": TOLERANCES.get(precision, TOLERANCES["fp32"]),
        "passed": all(c.passes(precision) for c in comparisons.values()),
        "outputs": {n: c.to_dict() for n, c in comparisons.items()},
    }
    if shapes:
        record["shapes"] = [{n: [int(d) for d in s] for n, s in shape_set.items()} for shape_set in shapes]
    reason = failure_reason(comparisons, precision)
    if reason:
        record["reason"] = reason
    return record


@dataclass(frozen=True)
class Domain:
    """The values an input takes: ``normal`` floats, ``uniform`` in [low, high] (pixels: 0..255), or integers
    ``index`` in [low, high] (an index into what it gathers from; masks are 0..1)."""

    kind: str = "normal"
    low: float = 0.0
    high: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Domain:
        return cls(str(d.get("kind", "normal")), float(d.get("low", 0.0)), float(d.get("high", 0.0)))


def _values(rng: np.random.Generator, shape: tuple[int, ...], dt: np.dtype, domain: Domain | None) -> np.ndarray:
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    if dt.kind == "f":
        if domain is not None and domain.kind == "uniform":
            return rng.uniform(domain.low, domain.high, shape).astype(dt)
        return rng.standard_normal(shape).astype(dt)
    if domain is not None and domain.kind in ("index", "uniform"):
        info = np.iinfo(dt)
        low, high = max(int(domain.low), info.min), min(int(domain.high), info.max)
        return rng.integers(low, high + 1, shape).astype(dt)
    return rng.integers(0, 10, shape).astype(dt)


def sample_inputs(
    specs: list[TensorSpec],
    count: int = 2,
    seed: int = 0,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    domains: Mapping[str, Domain] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Deterministic random inputs for ``specs`` at ``shapes`` (a representative shape set, e.g. one of
    ``Package.representative_shapes``; without it free dims are 1), with values in each input's ``domains``."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feeds: dict[str, np.ndarray] = {}
        for s in specs:
            shape = tuple(shapes[s.name]) if shapes and s.name in shapes else s.concrete(1)
            feeds[s.name] = _values(rng, shape, s.np_dtype, (domains or {}).get(s.name))
        samples.append(feeds)
    return samples
