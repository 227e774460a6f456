"""Compare a target's outputs with the float reference: max abs error, mean abs error, cosine.

Pure numpy on output dictionaries; it runs nothing itself except through a Session or Engine.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    ref_max: float

    def passes(self, precision: str) -> bool:
        tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
        return self.max_abs <= tol["rel_max_abs"] * max(1.0, self.ref_max) and self.cosine >= tol["min_cosine"]


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray) -> OutputComparison:
    if ref.shape != got.shape:
        return OutputComparison(name, float("inf"), float("inf"), 0.0, float(np.max(np.abs(ref), initial=0)))
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    diff = np.abs(r - g)
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    if nr == 0 and ng == 0:
        cos = 1.0
    elif nr == 0 or ng == 0:
        cos = 0.0
    else:
        cos = float(np.dot(r, g) / (nr * ng))
    return OutputComparison(
        name,
        float(diff.max(initial=0.0)),
        float(diff.mean()) if diff.size else 0.0,
        cos,
        float(np.abs(r).max(initial=0.0)),
    )


def compare(reference: list[dict[str, np.ndarray]], target: list[dict[str, np.ndarray]]) -> dict[str, OutputComparison]:
    """Per output, the worst case over all samples (largest error, smallest cosine)."""
    worst: dict[str, OutputComparison] = {}
    for ref_out, got_out in zip(reference, target):
        for name, ref in ref_out.items():
            c = compare_arrays(name, np.asarray(ref), np.asarray(got_out[name]))
            w = worst.get(name)
            if w is None:
                worst[name] = c
            else:
                worst[name] = OutputComparison(
                    name,
                    max(w.max_abs, c.max_abs),
                    max(w.mean_abs, c.mean_abs),
                    min(w.cosine, c.cosine),
                    max(w.ref_max, c.ref_max),
                )
    return worst


def verification_record(
    precision: str, comparisons: dict[str, OutputComparison], samples: int, against: str = "reference"
) -> dict[str, Any]:
    """The manifest's record of one target's verification."""
    return {
        "against": against,
        "samples": samples,
        "tolerance": TOLERANCES.get(precision, TOLERANCES["fp32"]),
        "passed": all(c.passes(precision) for c in comparisons.values()),
        "outputs": {n: {k: v for k, v in asdict(c).items() if k != "name"} for n, c in comparisons.items()},
    }


def sample_inputs(specs: list[TensorSpec], count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Deterministic random inputs for ``specs`` (symbolic dimensions set to 1)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feeds: dict[str, np.ndarray] = {}
        for s in specs:
            shape = s.concrete(1)
            dt = s.np_dtype
            if dt.kind == "f":
                feeds[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                feeds[s.name] = rng.integers(0, 2, shape).astype(dt)
            else:
                feeds[s.name] = rng.integers(0, 10, shape).astype(dt)
        samples.append(feeds)
    return samples
