"""Session: the six verbs of a deployment SDK (init, prepare, set_tensor, get_tensor, forward, close).

It validates tensors at the boundary and delegates to one Engine; it never reaches into an engine.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import arguments
from .backends import LoadOptions
from .errors import (
    BackendError,
    DTypeError,
    InputError,
    LuodiError,
    MissingInputError,
    PipelineError,
    ShapeError,
    StateError,
    UnknownTensorError,
)
from .package import Package
from .package.archive import is_package_path
from .runguard import RunGuard
from .selection import load_target, open_target, parse_target
from .stream import Stream
from .tensor import TensorSpec, concrete_shapes, dequantise_outputs

log = logging.getLogger("luodi")


class Session:
    """A model loaded on one engine, ready to run.

    ``model`` is a .luodi package (path or :class:`Package`), or an ONNX model (path or
    ``onnx.ModelProto``) which is compiled in memory for ``backend``. ``backend`` is a name or
    ``"BACKEND:PRECISION"`` as the CLI's ``--target`` takes it (``"openvino:int8"``). ``backend="auto"`` picks
    the fastest target measured on this host among those that run here and whose compile-time error fits
    ``accuracy_budget`` (a precision class: "fp32" unless the package was compiled with another);
    ``Session.selection`` says which and why. See luodi.selection.

    A target that failed at compile time is never picked by "auto", and asking for it by name is a
    :class:`~luodi.FailedTargetError` naming why, unless ``allow_failed=True`` (for debugging; logged).

    ``trust`` (a public key: .pub path or bytes) accepts only a package signed by that key, every member
    checked; ``license`` (a licence file) or ``passphrase`` unlock an encrypted package, decrypted in
    memory only. See docs/security.md.

    int8 I/O: a target compiled with ``int8_io`` reads and writes the quantised integers (its :attr:`inputs` and
    :attr:`outputs` show the integer dtype with ``scale`` and ``zero_point``). Its inputs take float arrays,
    quantised at the boundary as ONNX QuantizeLinear does (round half to even, saturate), or arrays of the integer
    dtype itself, passed to the engine as they are (no copy when C-contiguous). :meth:`run`, :meth:`forward` and
    :meth:`run_batch` return its outputs dequantised to float32, or with ``raw_int8=True`` the engine's integers
    (float = (q - zero_point) * scale). :meth:`run_validated` (the serving path) speaks integers both ways.

    Thread safety: tensors bound with :meth:`set_tensor` and results of :meth:`forward` are kept
    per thread, so several threads may share one session; engines whose run is not reentrant are
    serialised by a lock (``Engine.thread_safe``).
    """

    def __init__(
        self,
        model: Any,
        backend: str = "auto",
        device: str = "cpu",
        *,
        precision: str | None = None,
        threads: int | None = None,
        options: dict[str, Any] | None = None,
        accuracy_budget: str | None = None,
        allow_failed: bool = False,
        trust: Any = None,
        license: Any = None,  # noqa: A002 - the field's word
        passphrase: str | bytes | None = None,
        isolate: bool | int | str = False,
        raw_int8: bool = False,
    ) -> None:
        device, backend = arguments.text("device", device), arguments.text("backend", backend)
        precision = arguments.optional_text("precision", precision)
        accuracy_budget = arguments.optional_text("accuracy_budget", accuracy_budget)
        threads, options = arguments.threads(threads), arguments.mapping("options", options)
        self.device = device
        self.package: Package | None = None
        self._closed = False
        load_options = LoadOptions(device=device, threads=threads, extra=dict(options or {}))
        self._load_args: dict[str, Any] = {"threads": threads, "options": options, "isolate": isolate}
        self._models: dict[str, Session] = {}
        self._models_lock = threading.Lock()  # threads sharing a session load each further model once
        self._streams: dict[str, Any] = {}
        self.license: Any = None
        """The License that unlocked this session's package, if any."""
        self._release_license: Any = None
        backend, precision = parse_target(backend, precision)
        if isinstance(model, Package) or is_package_path(model):
            from .package.crypto import open_package  # verified against trust, unlocked (or says which key it needs)

            self.package, self.license = open_package(model, trust=trust, license=license, passphrase=passphrase)
            choice, load_options = open_target(
                self.package, backend, precision, device, accuracy_budget, allow_failed, load_options, trust, isolate
            )
            target, self.selection, self._engine = choice.target, choice.reason, choice.engine
            self.backend, self.precision = target["backend"], target["precision"]
            self._load_args["options"] = dict(load_options.extra)  # further models load on this backend by name
            try:
                self._inputs, self._outputs = self.package.target_io(target)
            except BaseException:
                self._engine.close()
                raise
        else:
            from .compiler.load_source import compile_in_memory

            self.backend = "onnxruntime" if backend == "auto" else backend
            self.precision = precision or "fp32"
            self.selection = f"{self.backend}: compiled in memory from an ONNX model"
            artifact, self._inputs, self._outputs = compile_in_memory(model, self.backend, self.precision)
            self._engine = load_target(None, artifact, load_options, isolate=isolate)
            del artifact
        if self.license is not None:
            try:
                # Released by close(), or when the session is garbage-collected unclosed.
                self._release_license = weakref.finalize(self, self.license.acquire_session())
            except BaseException:
                self._engine.close()
                raise
        if not isinstance(raw_int8, bool):
            self._engine.close()
            raise InputError(f"raw_int8 must be True or False, not {raw_int8!r}")
        self.raw_int8 = raw_int8
        self._dequantise = [] if raw_int8 else [s for s in self._outputs if s.is_quantised]
        self._input_by_name = {s.name: s for s in self._inputs}
        self._output_names = {s.name for s in self._outputs}
        self._lock = None if self._engine.thread_safe else threading.Lock()
        self._runs = RunGuard()
        self._local = threading.local()
        self._pipeline: Any = None
        log.info("luodi session: %s", self.selection)

    # -- description --------------------------------------------------------------------------
    @property
    def worker(self) -> Any:
        """The luodi.worker.Worker running the engine (pid, restarts) when the session is isolated, else None."""
        return getattr(self._engine, "worker", None)

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def pipeline(self) -> Any:
        """The package's pre/post-processing Pipeline, or None when the package has none."""
        if self._pipeline is None and self.package is not None and self.package.pipeline:
            from .pipeline import Pipeline

            pkg = self.package
            models = {name: (pkg.submodel(name).inputs, pkg.submodel(name).outputs) for name in pkg.model_names}
            models["main"] = (self._inputs, self._outputs)
            self._pipeline = Pipeline.from_spec(pkg.pipeline, self._inputs, models=models)
        return self._pipeline

    def model(self, name: str) -> Session:
        """Model ``name`` of a multi-model package ("main" is this one), on this session's engine and precision.

        Loaded on first use and closed with this session.
        """
        self._check_open()
        if name == "main":
            return self
        with self._models_lock:
            return self._models.get(name) or self._load_model(name)

    def _load_model(self, name: str) -> Session:
        if name not in self._models:
            if self.package is None or name not in self.package.model_names:
                have = ["main", *(self.package.model_names if self.package else [])]
                raise UnknownTensorError(f"this session has no model '{name}'; its models are {have}")
            self._models[name] = Session(
                self.package.submodel(name),
                backend=self.backend,
                precision=self.precision,
                device=self.device,
                **self._load_args,
            )
        return self._models[name]

    def stream(self, name: str | None = None, *, state: dict[str, str] | None = None, batch: int = 1) -> Stream:
        """A :class:`~luodi.stream.Stream` over this (stateful) model: it carries the state tensors between calls.

        ``state`` maps state inputs to the outputs holding their next value; by default the package
        pipeline's ``state``. With ``name`` the session keeps the stream, so ``stream("mic-1")`` returns
        the same stream every time (one state per stream); without, each call makes a new one.
        """
        self._check_open()
        if name is not None and name in self._streams:
            return self._streams[name]
        if state is None:
            state = dict((self.package.pipeline or {}).get("state", {})) if self.package else {}
        made = Stream(self, state, batch)
        if name is not None:
            self._streams[name] = made
        return made

    # -- the six verbs --------------------------------------------------------------------------
    def prepare(self, shapes: dict[str, tuple[int, ...]] | None = None) -> Session:
        """Fix input shapes, let the engine allocate, and warm it up.

        Without ``shapes``, a package's primary representative shapes (the ones it was verified at; an ONNX
        model's symbolic dims at 1). Inputs the package's pipeline fixes (e.g. a sample rate) get that value.
        """
        constants: dict[str, np.ndarray] = {}
        if self.package is not None:
            from .verify.representative import pipeline_constants

            constants = pipeline_constants(self.package)
            if shapes is None:
                shapes = self.package.representative_shapes[0]
        concrete = self._concrete(shapes)
        self._reshape_engine(concrete)
        try:
            warm = {n: np.zeros(s, dtype=self._input_by_name[n].np_dtype) for n, s in concrete.items()}
        except (MemoryError, ValueError) as exc:
            raise ShapeError(f"cannot allocate inputs of shapes {concrete} to warm up: {exc}") from exc
        warm.update({n: v for n, v in constants.items() if n in warm and v.shape == warm[n].shape})
        self._execute(warm)
        return self

    def reshape(self, shapes: dict[str, tuple[int, ...]] | None = None) -> Session:
        """Tell the engine the input shapes to plan for (symbolic dims of inputs not named default to 1).

        Engines with dynamic shapes (onnxruntime, ncnn, MNN, torch) need nothing; OpenVINO compiles a
        static-shape copy that later runs at exactly these shapes use. Unlike :meth:`prepare` it runs nothing.
        """
        self._reshape_engine(self._concrete(shapes))
        return self

    def _reshape_engine(self, shapes: dict[str, tuple[int, ...]]) -> None:
        runs = self._runs
        runs.inflight.append(None)  # like a run: close() must not free the engine under it
        try:
            if runs.closing:
                raise StateError("this session is closed")
            self._engine.reshape(shapes)
        finally:
            runs.inflight.pop()

    def _concrete(self, shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
        self._check_open()
        shapes = arguments.mapping("shapes", shapes)
        for name in shapes:
            self._spec(name)
        return concrete_shapes(self._inputs, shapes)

    def set_tensor(self, name: str, array: Any) -> None:
        """Bind input ``name`` for the next forward() on this thread."""
        self._check_open()
        self._state()[0][name] = self._validated(name, array)

    def forward(self) -> None:
        """Run the model on the tensors this thread bound with set_tensor()."""
        self._check_open()
        bound, _ = self._state()
        missing = [n for n in self._input_by_name if n not in bound]
        if missing:
            raise MissingInputError(f"forward() needs input(s) {missing} set first with set_tensor()")
        self._local.results = self._float(self._execute(bound))

    def get_tensor(self, name: str) -> np.ndarray:
        """An output of this thread's last forward(), or an input it bound."""
        self._check_open()
        bound, results = self._state()
        if name in results:
            return results[name]
        if name in bound:
            return bound[name]
        if name in self._output_names:
            raise StateError(f"output '{name}' has no value yet on this thread: call forward() first")
        if name in self._input_by_name:
            raise StateError(f"input '{name}' has not been set on this thread: call set_tensor() first")
        raise UnknownTensorError(self._unknown(name))

    def close(self) -> None:
        """Release the engine: new calls get StateError; runs already in progress finish first (close waits)."""
        if self._runs.close():
            self._closed = True
            for sub in self._models.values():
                sub.close()
            self._engine.close()
            self._release()

    def _release(self) -> None:
        if self._release_license is not None:
            self._release_license()
            self._release_license = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conveniences --------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Validate ``feeds`` (every input, by name) and return every output by name.

        ``feeds`` is a dict of input name -> array; a model with one input also takes that array alone.
        """
        if self._closed:
            raise StateError("this session is closed")
        feeds = arguments.feeds(feeds, self._input_by_name)
        checked = {name: self._validated(name, value) for name, value in feeds.items()}
        if len(checked) != len(self._input_by_name):
            missing = [n for n in self._input_by_name if n not in checked]
            raise MissingInputError(f"run() is missing input(s) {missing}")
        return self._float(self._execute(checked))

    def run_validated(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` for feeds already checked against :attr:`inputs`, without checking them again.

        For a server that checks each request once (every input present, its dtype and shape, C-contiguous)
        before joining requests into one batch. Anything else is the caller's fault: use :meth:`run`.
        """
        self._check_open()
        return self._execute(feeds)

    def run_batch(
        self, samples: Sequence[Any], max_batch: int = 8, *, pad: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """Run many samples in batches; the outputs of each, in input order, as :meth:`run` would give them.

        A sample is a feed dict (or an array, for a one-input model), with or without the batch axis: one given
        without it gets its outputs without it too. Samples are grouped by shape and dtype; where the model's
        batch axis is dynamic, up to ``max_batch`` rows of a group run stacked in one call (``pad=True``
        pads a group's last partial chunk to ``max_batch`` rows, so an engine that plans per shape sees one
        shape). A model with a fixed batch of B > 1 always gets chunks padded to B; a batch of 1 runs one by one.
        """
        from .batch import run_samples

        self._check_open()
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an int >= 1, got {max_batch!r}")
        samples = arguments.samples("samples", samples)
        if any(s.is_quantised for s in self._inputs):  # float samples of an int8-I/O target: quantised first
            samples = [
                {n: self._device(n, a) for n, a in s.items()} if isinstance(s, dict) else self._device(None, s)
                for s in samples
            ]
        return run_samples(
            samples,
            self._inputs,
            self._outputs,
            self._spec,
            lambda feeds: self._float(self._execute(feeds)),
            self._reshape_engine,
            max_batch,
            pad,
        )

    def predict(self, raw: Any, **options: Any) -> Any:
        """Pre-process ``raw`` (e.g. an image path or array), run, post-process, with the package's pipeline."""
        pipe = self.pipeline
        if pipe is None:
            raise PipelineError(
                "this model has no pre/post-processing pipeline; call run() with tensors, "
                "or compile a model that carries one (e.g. zoo:efficientnet-lite0)"
            )
        return pipe.run(raw, self, **options)

    # -- internals -------------------------------------------------------------------------------
    def _execute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs = self._runs
        runs.inflight.append(None)  # a shared hold: close() waits until none is held (ncnn segfaulted without)
        try:
            if runs.closing:  # checked after taking the hold, so close() either sees the hold or we see closing
                raise StateError("this session is closed")
            if self._lock is None:
                return self._engine.run(feeds)
            with self._lock:
                return self._engine.run(feeds)
        except LuodiError:
            raise
        except Exception as exc:  # an engine's own error on inputs that passed the checks (e.g. an empty batch)
            shapes = {n: list(a.shape) for n, a in feeds.items()}
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
            raise BackendError(f"{self.backend} failed to run the model on inputs {shapes}: {detail}") from exc
        finally:
            runs.inflight.pop()

    def _validated(self, name: str, value: Any) -> np.ndarray:
        spec = self._input_by_name.get(name)
        if spec is None:
            raise UnknownTensorError(self._unknown(name))
        if spec.scale is not None:  # an int8-I/O input: a float array is quantised here
            value = self._device(name, value)
        array = spec.as_array(value)
        spec.check(array)
        if not array.flags.c_contiguous:  # engines read C order; a view (transposed, strided, broadcast) is copied
            try:
                array = np.ascontiguousarray(array)
            except MemoryError as exc:
                raise ShapeError(
                    f"input '{name}' of shape {list(array.shape)} is a view too big to copy into memory"
                ) from exc
        return array

    def _device(self, name: str | None, value: Any) -> Any:
        """``value`` as the engine reads it: a float array for an int8-I/O input quantised; anything else as is."""
        spec = self._input_by_name.get(name) if name is not None else None
        if name is None and len(self._inputs) == 1:  # a bare array for a one-input model
            spec = self._inputs[0]
        if spec is None or not spec.is_quantised:
            return value
        if not isinstance(value, np.ndarray):  # a list of floats is quantised too, not cast to the integer type
            try:
                value = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise DTypeError(f"input '{spec.name}' takes a float or {spec.dtype} array, not this ({exc})") from exc
        return spec.quantise(value) if value.dtype.kind == "f" else value

    def _float(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An int8-I/O target's integer outputs dequantised to float32 (none with ``raw_int8``)."""
        return dequantise_outputs(outputs, self._dequantise) if self._dequantise else outputs

    def _spec(self, name: str) -> TensorSpec:
        spec = self._input_by_name.get(name)
        if spec is None:
            raise UnknownTensorError(self._unknown(name))
        return spec

    def _unknown(self, name: str) -> str:
        return (
            f"the model has no tensor named '{name}'; inputs: {list(self._input_by_name)}, "
            f"outputs: {sorted(self._output_names)}"
        )

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        local = self._local
        try:
            return local.bound, local.results
        except AttributeError:
            local.bound, local.results = {}, {}
            return local.bound, local.results

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("this session is closed")

    def __repr__(self) -> str:
        return f"<Session {self.backend}:{self.precision} on {self.device}>"
