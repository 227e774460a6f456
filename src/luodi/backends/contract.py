"""The plain data of the backend contract: what a backend declares (Availability, Option), what compile() makes
(Artifact), the options compile() and load() take, and their check. Imports nothing of luodi.backends, so the
parent side of the probe (probe.py) and the contract (base.py) both build on it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError, OptionError
from ..tensor import TensorSpec


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this host, and if not, why and what to do."""

    ok: bool
    reason: str = ""
    install: str = ""
    devices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    version: str = ""


@dataclass
class Artifact:
    """What a backend's compile() produces: engine files (name -> bytes) and engine options.

    The package stores ``files`` under ``targets/<backend>-<precision>/`` and ``options`` in the
    manifest; load() gets the same Artifact back.
    """

    backend: str
    precision: str
    files: dict[str, bytes] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    in_memory: bool = False
    """The files are decrypted plaintext: load() must not write them to disk (the backend's ``in_memory``)."""
    io: tuple[list[TensorSpec], list[TensorSpec]] | None = None
    """Set by a compile with ``CompileOptions.int8_io`` on a backend that quantises itself: the inputs and outputs as
    the device reads and writes them (integer dtype, scale, zero point), recorded as the target's ``io``."""

    @property
    def target(self) -> str:
        return f"{self.backend}-{self.precision}"

    def file(self, name: str) -> bytes:
        """The bytes of file ``name``; a ModelError when the artifact lacks it (e.g. a model's external data)."""
        try:
            return self.files[name]
        except KeyError:
            have = ", ".join(sorted(self.files)) or "none"
            raise ModelError(f"the {self.target} artifact has no file {name} (it has: {have})") from None


Shapes = dict[str, tuple[int, ...]]
"""Concrete shapes by input name: one set of inputs a model is run at."""


@dataclass(frozen=True)
class Option:
    """One engine option a backend takes (in ``CompileOptions.extra`` or ``LoadOptions.extra``): its type(s) and
    what it does. The base class refuses a key a backend does not declare, and a value of another type."""

    types: type | tuple[type, ...]
    help: str


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific options, checked against the backend's ``compile_options`` (an unknown key is an OptionError)."""
    source: Any = None
    """The frontend's SourceModel, for backends that compile from more than the ONNX graph (torch's program)."""
    inputs: tuple[TensorSpec, ...] = ()
    """The model's inputs, computed once by the compiler (empty: the backend reads them from the graph)."""
    outputs: tuple[TensorSpec, ...] = ()
    shapes: tuple[Shapes, ...] = ()
    """Representative input shapes, the first the primary one; later sets give every dynamic axis another size.
    Converters that trace (pnnx, MNN) or fix shapes (OpenVINO's static model) use these, never 1 for a free dim.
    Empty: the backend has no better knowledge than the specs."""
    model_bytes: bytes | None = None
    """The graph given to compile(), serialised once by the compiler for every consumer (None: serialise it yourself;
    it is None for a graph the compiler changed for this target, e.g. int8's, and for one over 2 GB)."""
    input_normalization: Mapping[str, Any] | None = None
    """The pipeline's normalisation the compiler folded into the graph's first Conv (``{"input", "mean", "std"}``),
    set by the compiler from the pipeline's record (package.schema.FOLDED_NORMALIZATION); None when nothing was
    folded. A backend that runs something other than the graph (torch's exported program) applies it itself."""
    calibration: tuple[Mapping[str, Any], ...] = ()
    """For an int8 target of a backend that quantises the model itself (``Backend.calibrates_itself``, e.g. a vendor
    toolkit): the calibration samples, feed dicts of float arrays through the model's pipeline."""
    int8_io: bool = False
    """For such a target: make the model's inputs and outputs the integers the device sees (set ``Artifact.io``)."""
    int8_ranges: Mapping[str, tuple[float, float]] | None = None
    """For such a target: the (min, max) that quantisation-aware fine-tuning (luodi.quant.qat) trained for tensors of
    the graph, by name; a backend whose toolkit takes activation ranges gives these tensors these ranges."""

    def io(self, model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The model's input and output specs: the compiler's, computed once, else read from ``model``'s graph."""
        if self.inputs and self.outputs:
            return list(self.inputs), list(self.outputs)
        from ..tensor import specs_from_onnx

        return specs_from_onnx(model)


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific options (``Session(options=...)``), checked against the backend's ``load_options``."""


def check_options(backend: str, verb: str, given: Mapping[str, Any], known: Mapping[str, Option]) -> None:
    """OptionError for a key ``backend`` does not take at ``verb`` (compile/load) or a value of another type."""
    for key, value in given.items():
        option = known.get(key)
        if option is None:
            takes = ", ".join(f"{k} ({_type_names(o.types)})" for k, o in sorted(known.items())) or "none"
            raise OptionError(f"backend '{backend}' has no {verb} option '{key}'; the {verb} options it takes: {takes}")
        types = option.types if isinstance(option.types, tuple) else (option.types,)
        # bool is an int in Python: an int option must not silently take True
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise OptionError(
                f"backend '{backend}' {verb} option '{key}' must be {_type_names(option.types)}, "
                f"got {type(value).__name__} {value!r:.80}; it is {option.help}"
            )


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
