"""TensorSpec: what a model input or output is (name, dtype, shape with symbolic dims, quantisation).

It carries dtype as run-time data, never as a type parameter; it must not import any engine.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DTypeError, ShapeError

Dim = int | str | None
"""A dimension: a fixed size, a symbolic name such as "batch", or None when unnamed and free."""

# ONNX TensorProto element types we accept at a model boundary, as numpy dtype names.
_ONNX_TO_NUMPY = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}


def numpy_dtype_of_onnx(elem_type: int) -> str:
    """Map an ONNX element type to a numpy dtype name."""
    try:
        return _ONNX_TO_NUMPY[elem_type]
    except KeyError:
        from .errors import ModelError

        raise ModelError(
            f"ONNX element type {elem_type} is not supported at a model boundary; "
            f"supported: {sorted(_ONNX_TO_NUMPY.values())}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``shape`` holds ints for fixed dims and strings (or None) for symbolic ones.
    ``scale``/``zero_point`` are set when the tensor is quantised integer data.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    scale: float | None = None
    zero_point: int | None = None
    _np: np.dtype = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_np", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def np_dtype(self) -> np.dtype:
        return self._np

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    def shape_str(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def check(self, array: np.ndarray) -> None:
        """Raise DTypeError/ShapeError naming this input when ``array`` does not fit it."""
        if array.dtype != self._np:
            how = f"convert it first, e.g. array.astype(numpy.{self.dtype})"
            if self.is_quantised:  # a cast would be wrong: the integers are quantised values
                how = (
                    f"quantise it first: round(x / {self.scale}) + {self.zero_point}, saturated "
                    f"(TensorSpec.quantise; Session.run does it for float inputs)"
                )
            raise DTypeError(f"input '{self.name}' expects dtype {self.dtype}, got {array.dtype}; {how}")
        shape = self.shape
        if array.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape)):
            raise ShapeError(f"input '{self.name}' expects shape {self.shape_str()}, got {list(array.shape)}")

    def as_array(self, value: Any) -> np.ndarray:
        """``value`` as an ndarray: an ndarray as is, anything else (list, scalar) converted to this dtype."""
        if isinstance(value, np.ndarray):
            return value
        try:
            return np.asarray(value, dtype=self._np)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DTypeError(
                f"input '{self.name}' expects a {self.dtype} array; got a {type(value).__name__} that numpy "
                f"cannot convert to one ({exc})"
            ) from exc

    @property
    def is_quantised(self) -> bool:
        """Integer data with a scale and zero point: float = (q - zero_point) * scale."""
        return self.scale is not None and self._np.kind in "iu"

    def quantise(self, array: np.ndarray) -> np.ndarray:
        """Float ``array`` as this tensor's integers, as ONNX QuantizeLinear does: x / scale rounded half to even,
        plus the zero point, saturated to the integer type."""
        info = np.iinfo(self._np)
        q = np.rint(np.asarray(array, dtype=np.float32) / np.float32(self.scale)) + (self.zero_point or 0)
        return np.clip(q, info.min, info.max).astype(self._np)

    def dequantise(self, array: np.ndarray) -> np.ndarray:
        """This tensor's integers as float32: (q - zero_point) * scale."""
        return ((array.astype(np.int32) - (self.zero_point or 0)) * np.float32(self.scale)).astype(np.float32)

    def concrete(self, fill: int = 1) -> tuple[int, ...]:
        """This shape with every symbolic dimension replaced by ``fill``."""
        return tuple(d if isinstance(d, int) else fill for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.scale is not None:
            d["scale"] = self.scale
            d["zero_point"] = self.zero_point
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=d["name"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            scale=d.get("scale"),
            zero_point=d.get("zero_point"),
        )


def specs_from_onnx(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs of an onnx.ModelProto as TensorSpecs."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        dims: list[Dim] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0:  # paddle2onnx writes -1 for a free dim
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(f"{vi.name}_d{i}")
        return TensorSpec(vi.name, numpy_dtype_of_onnx(tt.elem_type), tuple(dims))

    inputs = [spec(vi) for vi in graph.input if vi.name not in initializers]
    outputs = [spec(vi) for vi in graph.output]
    return inputs, outputs


def quantise_feeds(feeds: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """``feeds`` as an int8-I/O engine reads them: a float array for a quantised input quantised, the rest as is."""
    quantised = {s.name: s for s in inputs if s.is_quantised}
    return {n: quantised[n].quantise(a) if n in quantised and a.dtype.kind == "f" else a for n, a in feeds.items()}


def dequantise_outputs(outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """An int8-I/O engine's ``outputs`` as float32: each quantised output dequantised, the rest as is."""
    quantised = {s.name: s for s in specs if s.is_quantised}
    return {n: quantised[n].dequantise(a) if n in quantised else a for n, a in outputs.items()}


def concrete_shapes(specs: Sequence[TensorSpec], shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every input's concrete shape: ``shapes`` where given, else symbolic dims as 1; a ShapeError for a shape that
    is no sequence of ints or does not fit the input's spec."""
    concrete = {}
    for spec in specs:
        given = shapes.get(spec.name, spec.concrete(1))
        try:
            shape = tuple(operator.index(d) for d in given)
        except TypeError as exc:
            raise ShapeError(f"input '{spec.name}': a shape is a sequence of ints, got {given!r}") from exc
        fits = len(shape) == len(spec.shape) and all(
            n >= 1 and (not isinstance(d, int) or d == n) for d, n in zip(spec.shape, shape)
        )
        if not fits:
            raise ShapeError(f"input '{spec.name}' expects shape {spec.shape_str()}, got {list(shape)}")
        concrete[spec.name] = shape
    return concrete
