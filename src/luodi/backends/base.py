"""The contract between luodi and an inference engine: Backend (available/compile/load) and Engine.

A template in the style of Polygraphy's ``BaseRunner.infer()`` -> ``infer_impl()``: the public verbs here do the
checks every engine needs once (the engine is installed, the precision is one it has, the engine options are known
and of the right type, every input is fed, every output comes back, no call after close) and call the backend's
``_compile`` / ``_load`` / ``_run``. A backend module imports its engine library lazily, inside those methods;
nothing here imports one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import (
    BackendError,
    BackendUnavailableError,
    CompileError,
    LuodiError,
    MissingInputError,
    NotApplicableError,
    PackageError,
    StateError,
    UnknownTensorError,
)
from ..telemetry import import_engine
from ..tensor import TensorSpec
from .contract import (  # noqa: F401  (re-exported: the contract's data, luodi.backends.base.X as before)
    Artifact,
    Availability,
    CompileOptions,
    LoadOptions,
    Option,
    Shapes,
    check_options,
)


class Engine:
    """A loaded model on one engine. Subclasses implement ``_run``; ``run`` and the six verbs come with it.

    ``run`` checks what every engine needs (open, every input fed by name, every output back) and turns an engine's
    own exception into a BackendError naming the backend and the input shapes; dtypes and shapes are the Session's
    to check, once, at the boundary. ``_run`` must be safe to call from several threads at once unless
    ``thread_safe`` is False, in which case the Session serialises calls with a lock. An Engine is a context
    manager: ``with backend.load(artifact, options) as engine:`` closes it on the way out.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    thread_safe: ClassVar[bool] = True
    backend: str = "engine"
    """The name of the backend that loaded it (set by Backend.load), for messages."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The override point before the template was ``run``: a subclass that still defines ``run`` (a plugin
        # written then) and no ``_run`` gets its ``run`` as ``_run`` under the checking ``run``.
        if "run" in cls.__dict__ and _defines_below(cls, "_run", Engine) is None:
            cls._run = cls.__dict__["run"]  # type: ignore[method-assign]
            cls.run = Engine.run  # type: ignore[method-assign]

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._bound: dict[str, np.ndarray] = {}
        self._results: dict[str, np.ndarray] = {}
        self._input_names = frozenset(s.name for s in inputs)
        self._output_count = len(outputs)
        self._closed = False

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for ``feeds`` (every input by name, already of its dtype and shape)."""
        if self._closed:
            raise StateError(f"this {self.backend} engine is closed")
        if feeds.keys() != self._input_names:
            self._refuse_names(feeds)
        try:
            outputs = self._run(feeds)
        except LuodiError:
            raise
        except Exception as exc:  # an engine's own exception on inputs that passed the checks (e.g. an empty batch)
            shapes = {n: list(np.shape(a)) for n, a in feeds.items()}
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
            raise BackendError(f"{self.backend} failed to run the model on inputs {shapes}: {detail}") from exc
        if len(outputs) != self._output_count:
            missing = [o.name for o in self.outputs if o.name not in outputs]
            raise BackendError(
                f"{self.backend} returned {len(outputs)} output(s) for a model with {self._output_count}"
                + (f": no {missing}" if missing else "")
            )
        return outputs

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__qualname__} must implement _run(feeds)")

    def _refuse_names(self, feeds: dict[str, np.ndarray]) -> None:
        unknown = sorted(set(feeds) - self._input_names)
        if unknown:
            raise UnknownTensorError(f"the model has no input(s) {unknown}; its inputs: {sorted(self._input_names)}")
        missing = sorted(self._input_names - set(feeds))
        raise MissingInputError(f"run() is missing input(s) {missing}")

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Prepare for these input shapes. Engines with dynamic shapes need do nothing."""

    def profile(self) -> list[dict[str, Any]] | None:
        """The engine's own per-operator times over the runs since load, when it was loaded with the backend's
        ``profiling`` load option: one dict per engine node, ``{"node", "op", "ms", "calls"}`` (``ms`` the total
        over ``calls`` runs), in the engine's names. None when the engine has no profiler or was not asked for one.
        Reading the profile may end it (onnxruntime writes its trace once): call it after the runs."""
        return None

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
        """Release the engine; ``run`` then raises StateError. Subclasses free their engine and call this."""
        self._closed = True
        self._bound.clear()
        self._results.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _defines_below(cls: type, name: str, base: type) -> type | None:
    """The first class in ``cls``'s MRO, before ``base``, whose body defines ``name``; None when none does."""
    for klass in cls.__mro__:
        if klass is base:
            return None
        if name in klass.__dict__:
            return klass
    return None


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
    calibrates_itself: ClassVar[bool] = False
    """Whether the engine's own toolkit quantises an int8 target (a vendor NPU converter): the compiler then gives it
    the float graph with ``CompileOptions.calibration`` instead of a QDQ graph from luodi.quant."""
    static_shapes: ClassVar[bool] = False
    """Whether the engine file is built at one set of shapes (``Artifact.options["shapes"]``, by input name; a larger
    first axis runs sample by sample): compile-time verification then checks only inputs of those shapes."""
    estimates: ClassVar[tuple[str, ...]] = ()
    """The precisions whose compiled file ``estimate`` can judge for a device this host cannot run (litert's int8
    .tflite on an Arm Ethos-U NPU, through Vela): ``luodi compile --estimate CONFIG``, stored as the target's
    ``estimate``, never a runnable target."""
    int8_unsupported: ClassVar[str] = ""
    """Why the engine has no int8 target here, shown by `luodi backends`."""
    crash_prone: ClassVar[bool] = False
    """Whether the engine's loader or kernels can kill the process on a malformed file (a segfault, not an
    error): probe() then loads and runs an artifact in a child process before it is loaded in this one."""
    precision_note: ClassVar[str] = ""
    """Said after the precisions when compile() is asked for another one (e.g. why bf16 is not offered)."""
    compile_options: ClassVar[Mapping[str, Option]] = {}
    """The keys the backend takes in ``CompileOptions.extra``; any other key is an OptionError."""
    load_options: ClassVar[Mapping[str, Option]] = {}
    """The keys the backend takes in ``LoadOptions.extra`` (``Session(options=...)``); any other is an OptionError."""

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

    def int8_float_precisions(self) -> tuple[str, ...]:
        """Besides fp32, the precisions in which the engine runs an int8 graph's float layers on this host (its
        ``float_precision`` compile option): what the int8 fallback may keep layers in. None by default."""
        return ()

    def quantises_itself(self, extra: Mapping[str, Any]) -> bool:
        """Whether an int8 target compiled with engine options ``extra`` is quantised by the engine's own toolkit
        (given the float graph and ``CompileOptions.calibration``) rather than from luodi's QDQ graph: the class's
        ``calibrates_itself`` unless an option chooses (openvino's ``quantizer``)."""
        return self.calibrates_itself

    def check_estimate(self, config: str) -> None:
        """Refuse ``config`` before any work is done (unknown, or its estimator not installed)."""
        raise NotApplicableError(f"backend '{self.name}' makes no estimate for other devices ('{config}')")

    def estimate(self, artifact: Artifact, config: str) -> dict[str, Any]:
        """The estimate for device configuration ``config`` of ``artifact`` (a precision in ``estimates``)."""
        raise NotApplicableError(f"backend '{self.name}' makes no estimate for other devices ('{config}')")

    def install_hint(self) -> str:
        return f"pip install 'luodi[{self.extra}]'" if self.extra else ""

    def require(self) -> Any:
        """Import and return the engine module, or raise BackendUnavailableError saying why."""
        avail = self.available()
        if not avail.ok:
            hint = f"; install it with: {avail.install}" if avail.install else ""
            raise BackendUnavailableError(f"backend '{self.name}' cannot run here: {avail.reason}{hint}")
        return import_engine(self.module) if self.module else None

    def compile(self, model: Any, options: CompileOptions | None = None) -> Artifact:
        """Host side, offline: the engine files for ``model`` (an onnx.ModelProto) at ``options.precision``.

        Checks once what every backend needs (the engine is installed, the precision is one it has, the engine
        options are known and typed), then calls ``_compile``.
        """
        options = options or CompileOptions()
        self.require()
        if options.precision not in self.precisions:
            note = f" ({self.precision_note})" if self.precision_note else ""
            raise CompileError(
                f"{self.name} has no precision '{options.precision}'; choose one of {list(self.precisions)}{note}"
            )
        self.check_compile_options(options.extra, options.precision)
        return self._compile(model, options)

    def check_compile_options(self, extra: Mapping[str, Any], precision: str) -> None:
        """The compile options' names and types (and, where a backend says more, their values and combinations):
        ``luodi.compile`` calls this for every target before any work, so a typo costs no calibration."""
        check_options(self.name, "compile", extra, self.compile_options)

    def load(self, artifact: Artifact, options: LoadOptions | None = None) -> Engine:
        """Device side: ``artifact`` loaded as an Engine. Checks the engine is installed and the engine options,
        then calls ``_load``; the engine comes back named after this backend (for its messages)."""
        options = options or LoadOptions()
        self.require()
        check_options(self.name, "load", options.extra, self.load_options)
        if artifact.in_memory and not self.in_memory:
            raise PackageError(file_only_refusal(self.name))
        engine = self._load(artifact, options)
        engine.backend = self.name
        return engine

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        raise NotImplementedError(f"{type(self).__qualname__} must implement _compile(model, options)")

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        raise NotImplementedError(f"{type(self).__qualname__} must implement _load(artifact, options)")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Before the template a backend overrode ``compile``/``load`` (plugins written then still do): such a
        # method becomes the ``_compile``/``_load`` the checking verb calls, unless the class has one already.
        for verb in ("compile", "load"):
            if verb in cls.__dict__ and _defines_below(cls, f"_{verb}", Backend) is None:
                setattr(cls, f"_{verb}", cls.__dict__[verb])
                setattr(cls, verb, getattr(Backend, verb))

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


def file_only_refusal(backend: str, where: str = "the package") -> str:
    """Why decrypted files may not go to ``backend``, which loads a model only from a file (``in_memory`` False)."""
    return (
        f"{where} is encrypted and backend '{backend}' can only load a model from a file, which would put the "
        "decrypted model on disk: choose a backend that loads from memory (see the 'encrypted' column of "
        "`luodi backends`)"
    )


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
