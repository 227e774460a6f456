"""Inputs to run a package at the shapes users run it: its representative shape sets, with the values its
pipeline fixes.

Everything that runs a package after it is written (server warm-up, `luodi verify`, auto's timing) takes its inputs
from here, so none of them fills a free dim with 1. It generates arrays only; it runs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import Domain, sample_inputs


def pipeline_constants(package: Any) -> dict[str, np.ndarray]:
    """Inputs the package's pipeline feeds with a fixed value (e.g. silero-vad's ``sr`` = 16000), in their dtypes.

    A random value there is outside the model's domain (silero-vad rejects any rate but its own), so whatever runs
    the model without the pipeline uses these.
    """
    specs = {s.name: s for s in package.inputs}
    found: dict[str, np.ndarray] = {}
    for step in (package.pipeline or {}).get("graph") or []:
        if isinstance(step, dict) and step.get("model") == "main" and isinstance(step.get("const"), dict):
            for name, value in step["const"].items():
                spec = specs.get(name)
                try:
                    array = np.asarray(value, dtype=spec.np_dtype) if spec is not None else None
                except (TypeError, ValueError, OverflowError):
                    continue  # a malformed constant: the input stays random, as for any other input
                if array is not None and array.ndim == len(spec.shape):
                    found[name] = array
    return found


def recorded_domains(package: Any) -> dict[str, Domain]:
    """The value domain of each input the compiler recorded (``shapes.domains``: pixels 0..255, an index within
    what it gathers from, a constant); empty for a package written before it did."""
    recorded = (package.manifest.get("shapes") or {}).get("domains") or {}
    return {name: Domain.from_dict(d) for name, d in recorded.items() if isinstance(d, dict)}


def representative_inputs(package: Any, per_set: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``per_set`` deterministic random feeds for each of ``package.representative_shapes``, the primary set first.

    Values are drawn from the domains the compiler recorded (see :func:`luodi.verify.sample_inputs`), and inputs
    the pipeline fixes get that value (:func:`pipeline_constants`).
    """
    constants, domains = pipeline_constants(package), recorded_domains(package)
    feeds: list[dict[str, np.ndarray]] = []
    for i, shapes in enumerate(package.representative_shapes):
        for sample in sample_inputs(package.inputs, per_set, seed + i, shapes=shapes, domains=domains):
            feeds.append({**sample, **{n: v for n, v in constants.items() if n in sample}})
    return feeds
