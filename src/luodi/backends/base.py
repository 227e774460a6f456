"""The contract between luodi and an inference engine: Backend (available/compile/load) and Engine.

A backend module imports its engine library lazily, inside these methods; nothing here imports one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import BackendUnavailableError, ModelError, StateError, UnknownTensorError
from ..telemetry import import_engine
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
class CompileOptions:
    precision: str = "fp32"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    source: Any = None
    """The frontend's SourceModel, for backends that compile from more than the ONNX graph (torch)."""
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


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    """A loaded model on one engine. Subclasses implement ``run``; the six verbs come with it.

    ``run`` must be safe to call from several threads at once unless ``thread_safe`` is False,
    in which case the Session serialises calls with a lock.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    thread_safe: ClassVar[bool] = True

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._bound: dict[str, np.ndarray] = {}
        self._results: dict[str, np.ndarray] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Prepare for these input shapes. Engines with dynamic shapes need do nothing."""

    def set_tensor(self, name: str, array: np.ndarray) -> None:
        self._bound[name] = array

    def forward(self) -> None:
        self._results = self.run(self._bound)

    def get_tensor(self, name: str) -> np.ndarray:
        if name in self._results:
            return self._results[name]
        if name in self._bound:
            return self._bound[name]
        if any(o.name == name for o in self.outputs):
            raise StateError(f"output '{name}' has no value yet: call forward() first")
        raise UnknownTensorError(f"no tensor named '{name}'")

    def close(self) -> None:
        self._bound.clear()
        self._results.clear()


class Backend:
    """One inference engine. Subclasses live in ``luodi/backends/<name>.py`` or in a plugin."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    extra: ClassVar[str | None] = None
    """The pip extra that installs the engine, e.g. "openvino" for ``luodi[openvino]``."""
    module: ClassVar[str | None] = None
    """The engine's Python module, imported lazily to tell availability."""
    int8_policy: ClassVar[dict[str, Any] | None] = None
    """How the engine runs int8, as data that luodi.quant reads (see luodi/quant/policy.py): activation and
    weight dtype/symmetry/granularity, rounding, which operators run in int8. None: no int8 target."""
    in_memory: ClassVar[bool] = False
    """Whether load() can take an artifact's files from memory without writing any file; encrypted
    packages load only on such backends."""
    int8_unsupported: ClassVar[str] = ""
    """Why the engine has no int8 target here, shown by `luodi backends`."""
    crash_prone: ClassVar[bool] = False
    """Whether the engine's loader or kernels can kill the process on a malformed file (a segfault, not an
    error): probe() then loads and runs an artifact in a child process before it is loaded in this one."""

    def available(self) -> Availability:
        if self.module is None:
            return Availability(True, devices=self.devices, precisions=self.precisions)
        try:
            mod = import_engine(self.module)
        except ImportError as exc:
            return Availability(
                False,
                reason=f"{self.module} is not installed ({exc.msg})",
                install=self.install_hint(),
                precisions=self.precisions,
            )
        return Availability(
            True,
            devices=self.devices,
            precisions=self.precisions,
            version=str(getattr(mod, "__version__", "")),
        )

    def install_hint(self) -> str:
        return f"pip install 'luodi[{self.extra}]'" if self.extra else ""

    def require(self) -> Any:
        """Import and return the engine module, or raise BackendUnavailableError saying why."""
        avail = self.available()
        if not avail.ok:
            hint = f"; install it with: {avail.install}" if avail.install else ""
            raise BackendUnavailableError(f"backend '{self.name}' cannot run here: {avail.reason}{hint}")
        return import_engine(self.module) if self.module else None

    def compile(self, model: Any, options: CompileOptions) -> Artifact:
        raise NotImplementedError

    def load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        raise NotImplementedError

    def validate(self, artifact: Artifact) -> None:
        """Cheap checks of the engine files without the engine reading them (a ModelError); load() runs them too."""

    def probe(self, artifact: Artifact, shapes: list[Shapes], *, trusted: bool = False) -> None:
        """Before load(): prove that ``artifact`` loads and runs at ``shapes`` without crashing the process.

        A no-op unless the engine is ``crash_prone``, the artifact came from a package signed by a trusted key
        (``trusted``), or it passed before on this host (see luodi.backends.probe). BackendError when it crashes.
        """
        if not self.crash_prone or trusted:
            return
        self.validate(artifact)  # what can be refused without the engine costs no child process
        from .probe import prove_in_child

        prove_in_child(artifact, shapes, self.available().version)

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


@contextlib.contextmanager
def memory_file(data: bytes, name: str = "model") -> Iterator[str]:
    """A path holding ``data`` that is not on any disk: an anonymous memory file (Linux memfd), closed on exit.

    For engines that load only from a path, when the bytes are decrypted plaintext (Artifact.in_memory).
    The path (/proc/self/fd/N) opens only in this process; the memory is freed when the engine has read it.
    """
    if not hasattr(os, "memfd_create"):
        raise BackendUnavailableError(
            "this engine loads models only from files, and this platform has no memory files (memfd): "
            "an encrypted package cannot be loaded on it without writing the decrypted model to disk"
        )
    fd = os.memfd_create(f"luodi-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
