"""The concrete input shapes a converter traces or fixes a model at (pnnx, MNN's trial run, OpenVINO's static model).

They come from ``CompileOptions.shapes`` (the compiler's representative shape sets); this module checks them against
the model's inputs and derives the second set that keeps every free axis they vary dynamic. It must not run any engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import CompileError
from ..tensor import TensorSpec
from .base import CompileOptions, Shapes


def _checked(spec: TensorSpec, given: Sequence[int], where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in given)
    except (TypeError, ValueError):
        raise CompileError(f"{where} shape {list(given)!r} for input '{spec.name}' is not a list of sizes") from None
    if len(shape) != len(spec.shape):
        raise CompileError(
            f"{where} shape {list(shape)} for input '{spec.name}' has {len(shape)} dims; the input is "
            f"{spec.shape_str()} ({len(spec.shape)} dims)"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if got < 1:
            raise CompileError(f"{where} shape {list(shape)} for input '{spec.name}' has size {got} on axis {axis}")
        if isinstance(want, int) and want != got:
            raise CompileError(
                f"{where} shape {list(shape)} for input '{spec.name}' has {got} on axis {axis}, which the model "
                f"fixes at {want} ({spec.shape_str()})"
            )
    return shape


def given_shapes(inputs: Sequence[TensorSpec], options: CompileOptions) -> list[Shapes]:
    """``options.shapes`` checked against ``inputs`` (a CompileError naming the input when one does not fit);
    empty when the caller gave none."""
    sets: list[Shapes] = []
    for i, shapes in enumerate(options.shapes):
        where = "the representative" if i == 0 else f"shape set {i + 1}'s"
        missing = [s.name for s in inputs if s.name not in shapes]
        if missing:
            raise CompileError(f"{where} shapes {dict(shapes)} give no shape for input(s) {missing}")
        sets.append({s.name: _checked(s, shapes[s.name], where) for s in inputs})
    return sets


def primary_shapes(inputs: Sequence[TensorSpec], options: CompileOptions) -> Shapes:
    """The shapes a converter traces or test-runs at: the first representative set, else every free dim at 1
    (what luodi did before shapes were known; a model that cannot run at 1 needs shapes)."""
    sets = given_shapes(inputs, options)
    return sets[0] if sets else {s.name: s.concrete(1) for s in inputs}


def second_shapes(inputs: Sequence[TensorSpec], primary: Shapes, options: CompileOptions) -> Shapes | None:
    """The next set that moves a free axis: per free axis the first later given size that differs from ``primary``
    (the primary size where none does); None when no given set moves any axis.

    An axis the sets keep at one size stays there: a free dim is not always free (PP-OCR's recogniser declares its
    height '?' and runs at 48 only; traced at 96 its Reshape fails), so only the sizes given are trusted."""
    later = given_shapes(inputs, options)[1:]
    out: Shapes = {}
    moved = False
    for s in inputs:
        dims = list(primary[s.name])
        for axis, d in enumerate(s.shape):
            if isinstance(d, int):
                continue
            other = next((o[s.name][axis] for o in later if o[s.name][axis] != dims[axis]), None)
            if other is not None:
                dims[axis], moved = other, True
        out[s.name] = tuple(dims)
    return out if moved else None


def fit_sample(a: np.ndarray, shape: Any, name: str, backend: str) -> np.ndarray:
    """A calibration sample at the shape a static-shape backend built (a batch given at once is split into samples
    by the caller: a sample of a larger batch keeps its first row)."""
    shape = tuple(int(d) for d in shape)
    if a.shape == shape:
        return a
    if a.ndim == len(shape) and a.shape[1:] == shape[1:] and shape[0] == 1 and a.shape[0] >= 1:
        return a[:1]
    raise CompileError(
        f"{backend}: calibration sample for input '{name}' has shape {list(a.shape)}, built at {list(shape)}"
    )


def device_specs(options: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An int8 artifact's inputs and outputs as its device reads and writes them: integers with the scale and zero
    point its quantiser chose (``options["device_io"]``), the model's own specs (``inputs``/``outputs``) elsewhere."""
    params = options.get("device_io") or {}

    def specs(key: str) -> list[TensorSpec]:
        out = []
        for d in options[key]:
            s = TensorSpec.from_dict(d)
            p = params.get(s.name)
            out.append(TensorSpec(s.name, p.get("dtype", "int8"), s.shape, p["scale"], p["zero_point"]) if p else s)
        return out

    return specs("inputs"), specs("outputs")
