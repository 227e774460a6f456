"""MNN (Alibaba's mobile inference engine): ONNX -> .mnn at compile time, the Module API at run time.

Compile converts the canonical graph with MNN's converter and runs the result once, both in a child
process (luodi.backends._mnn_convert: MNN crashes on many graphs it cannot handle, and a crash must not
take the caller down); an operator MNN cannot handle is an ``UnsupportedOpError`` at compile time, naming
the op and node when the converter names it. The child costs about 0.2-0.4 s per compile.

Precisions, as measured with the MNN 3.6.1 x86-64 wheel on an AVX-512 (incl. AVX512_BF16) CPU:

- ``fp32``: runtime precision ``"high"``; the same as onnxruntime to about 1e-5 on logits.
- ``fp16``: weights stored as fp16 in the .mnn file (converter ``--fp16``, half the size) and
  runtime precision ``"low"``. On x86 the wheel computes in fp32 whatever the mode ("low" and
  ``Low_BF16`` give results bit-identical to "high" here; it reports ``fp16:0``), so the loss is
  the weight rounding alone (about 6e-2 on EfficientNet-Lite0 logits, within the fp16 tolerance).
  On ARMv8.2 devices "low" also computes in fp16.
- ``bf16`` is not offered: this wheel's CPU backend has no bf16 kernels, ``Low_BF16`` runs fp32.
- ``int8``: MNN's int8 model, built by MNN's converter from luodi's activation ranges (compile option ``ranges``,
  ``luodi`` by default: MSE-optimal ranges measured on MNN's float model, written into MNN's compression-params
  file; biases corrected for the int8 weights' mean error, option ``bias_correction``) or by MNN's own
  post-training quantiser (``ranges=mnn``, options ``method``: KL by default, EMA, ADMM, and ``weight_method``:
  MAX_ABS, ADMM; the ``mnnquant`` function of MNN's ``_tools`` extension, never the telemetry-sending command);
  see luodi.backends._mnn_quant. Calibrated on the compile's calibration samples (``calibrates_itself``) and
  judged like every int8 target: top-1 agreement with the float model on the validation samples, run on MNN.
  Symmetric int8: per-tensor activations (with zero points under ``activations=asymmetric``), per-channel
  convolution weights. The boundary stays float (MNN quantises inside the model). One float input only.

int64: MNN's converter turns int64 tensors into int32, and pymnn read an int64 input buffer as int32 pairs
(``[1, 2, 3, 4]`` as ``[1, 0, 2, 0]``). int64 inputs are narrowed to int32 at the boundary after a range check
(a value outside int32 is an ``InputError``, never a wrap) and int64 outputs are widened back.

Run time uses ``MNN.nn.load_module_from_file`` with a ``RuntimeManager`` per engine. pymnn loads
modules from a path only, so load() writes the artifact bytes to a temporary file, loads it (MNN
reads the file whole) and deletes it at once. Numpy inputs become ``MNN.expr.const`` vars (one
copy in); outputs are copied out of ``Var.read()``, whose array is a view that the next forward
overwrites.

Dynamic shapes: the module is loaded with ``shape_mutable=True``, so any batch size runs without
a call to reshape(). A new input shape makes MNN re-run shape inference and re-plan memory on that
forward; nothing is recompiled. Measured: ~10 us extra on the 5-op test CNN (a batch-1 run takes
10 us steady, 21 us right after a batch-2 run); on EfficientNet-Lite0 the first run at a new batch
size is within the noise of the steady-state runs (11-12 ms at batch 1, 2 threads). Alternating
shapes therefore costs about nothing; Session.prepare(shapes) still absorbs it up front.

Threads: ``thread_safe = False``, so a luodi Session serialises run() with its lock, and run()
also holds a process-wide lock. MNN documents that an ``Executor`` must be used by one thread at a
time and that concurrent modules each need their own Executor bound with ``ExecutorScope``; pymnn
does not expose ``ExecutorScope``, so every module in the process shares the global Executor.
Per-thread ``Module.clone()`` would also buy nothing: pymnn holds the GIL for the whole forward
(measured: two threads with a clone each run no faster than one thread). MNN's own intra-op
threads (``threads=`` / ``numThread``) are where the parallelism is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    BackendError,
    BackendUnavailableError,
    CompileError,
    InputError,
    ModelError,
    NotApplicableError,
)
from ..tensor import TensorSpec
from . import _mnn_convert
from ._int8 import VENDOR_W8A8
from ._mnn_convert import MODEL_FILE
from ._mnn_quant import (
    DEFAULT_METHOD,
    DEFAULT_RANGES,
    FEATURE_METHODS,
    RANGES,
    WEIGHT_METHODS,
    check_methods,
    stacked_samples,
    write_calibration,
    write_samples,
)
from ._onnx_ptq import correct_biases, rounded_symmetric
from ._unfold import unfold_input_normalization
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, Option, memory_file
from .shapes import primary_shapes

# precision -> (converter stores fp16 weights, runtime precision mode)
_PRECISIONS: dict[str, tuple[bool, str]] = {"fp32": (False, "high"), "fp16": (True, "low")}
_EXECUTOR_LOCK = threading.Lock()  # pymnn's modules all share MNN's global Executor


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Send C-level stdout/stderr (MNN prints with printf) to a buffer; yields a list with the text."""
    libc = ctypes.CDLL(None)
    out: list[str] = []
    # A memory file where there is one: a decrypted model's load must leave nothing in TMPDIR, not even a log.
    buf_file = os.fdopen(os.memfd_create("luodi-log"), "w+b") if hasattr(os, "memfd_create") else None
    with buf_file or tempfile.TemporaryFile(mode="w+b") as buf:
        saved = [os.dup(1), os.dup(2)]
        libc.fflush(None)
        try:
            os.dup2(buf.fileno(), 1)
            os.dup2(buf.fileno(), 2)
            yield out
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            buf.seek(0)
            out.append(buf.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def _temporary_file(data: bytes) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="luodi-", suffix=".mnn")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.unlink(path)


def _check_flatbuffer(data: bytes, target: str) -> None:
    """Refuse what MNN's flatbuffer header shows is not a model: too short, or a root table or vtable off the end.

    MNN reads its .mnn without a flatbuffers verifier, so a malformed file can crash it; this is the part a
    header check can see, the probe (luodi.backends.probe) proves the rest in a child process.
    """
    size = len(data)
    if size < 16:
        raise ModelError(f"the {target} model.mnn has {size} bytes: it is not an MNN model; recompile the package")
    root = int.from_bytes(data[0:4], "little")
    if root % 4 or not 4 <= root <= size - 4:
        raise ModelError(f"the {target} model.mnn's root table offset {root} is outside its {size} bytes")
    vtable = root - int.from_bytes(data[root : root + 4], "little", signed=True)
    if not 0 <= vtable <= size - 4:
        raise ModelError(f"the {target} model.mnn's table layout points outside its {size} bytes")
    vsize, tsize = (
        int.from_bytes(data[vtable : vtable + 2], "little"),
        int.from_bytes(data[vtable + 2 : vtable + 4], "little"),
    )
    if vsize < 4 or vsize % 2 or vtable + vsize > size or root + tsize > size:
        raise ModelError(f"the {target} model.mnn's table layout does not fit its {size} bytes; recompile the package")
    for i in range(4, vsize, 2):
        field = int.from_bytes(data[vtable + i : vtable + i + 2], "little")
        if field and field + 4 > tsize:
            raise ModelError(f"the {target} model.mnn's net table has a field outside the table; recompile the package")


def _import_mnn() -> tuple[Any, Any, Any]:
    """``MNN``, ``MNN.nn``, ``MNN.expr``, imported quietly (the C library prints CPU features)."""
    with _captured_output():
        import MNN
        import MNN.expr as F
        import MNN.nn as nn
    return MNN, nn, F


def _expr_dtype(F: Any, dtype: np.dtype) -> Any:
    table = {
        "float32": F.float,
        "float64": F.double,
        "int32": F.int,
        "int64": F.int64,
        "uint8": F.uint8,
        "int8": F.int8,
    }
    try:
        return table[dtype.name]
    except KeyError:
        raise ModelError(f"mnn cannot take inputs of dtype {dtype.name}; supported: {sorted(table)}") from None


_NARROWED = {np.dtype(np.int64): np.dtype(np.int32)}
_INT32 = np.iinfo(np.int32)


def _engine_dtype(dtype: np.dtype) -> np.dtype:
    return _NARROWED.get(dtype, dtype)


def _narrowed(name: str, array: np.ndarray) -> np.ndarray:
    """An int64 input as the int32 MNN computes in; an InputError when a value does not fit (never a wrap)."""
    array = np.asarray(array)
    if array.dtype != np.int64:
        return array
    if array.size and (array.max() > _INT32.max or array.min() < _INT32.min):
        raise InputError(
            f"input '{name}' has int64 values outside int32 ({int(array.min())}..{int(array.max())}); MNN computes "
            f"int64 tensors in int32, so they would wrap: keep them within {_INT32.min}..{_INT32.max} or choose "
            "another target"
        )
    return array.astype(np.int32)


class MnnEngine(Engine):
    # Not reentrant: one module, and all pymnn modules share the global Executor (see module doc).
    thread_safe = False

    def __init__(self, module: Any, runtime: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        _, _, F = _import_mnn()
        self._module = module
        self._runtime = runtime  # keep the RuntimeManager alive as long as the module
        self._const = F.const
        self._nchw = F.NCHW
        self._nc4hw4 = F.NC4HW4
        self._convert = F.convert
        # MNN's converter turns int64 tensors into int32 and reads an int64 buffer as int32 pairs ([1, 2] as
        # [1, 0, 2, 0]): int64 inputs are narrowed at the boundary (checked to fit), int64 outputs widened back.
        self._in = [(s.name, _expr_dtype(F, _engine_dtype(s.np_dtype))) for s in inputs]
        self._narrow = [s.name for s in inputs if s.np_dtype in _NARROWED]
        self._widen = {s.name: s.np_dtype for s in outputs if s.np_dtype in _NARROWED}
        self._out_names = [s.name for s in outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        const, nchw = self._const, self._nchw
        if self._narrow:
            feeds = {**feeds, **{name: _narrowed(name, feeds[name]) for name in self._narrow}}
        with _EXECUTOR_LOCK:
            try:
                args = []
                for name, dt in self._in:
                    a = feeds[name]
                    if not a.flags.c_contiguous:
                        a = np.ascontiguousarray(a)
                    args.append(const(a, a.shape, nchw, dt))
                outs = self._module.forward(args)
                result = {}
                for name, var in zip(self._out_names, outs):
                    if var.data_format == self._nc4hw4:
                        var = self._convert(var, nchw)
                    result[name] = np.array(var.read(), copy=True)
            except (SystemError, RuntimeError, ValueError, TypeError) as exc:  # pymnn's errors are bare
                shapes = {n: list(np.shape(a)) for n, a in feeds.items()}
                raise BackendError(f"mnn failed to run the model on inputs {shapes}: {exc}") from exc
        if len(result) != len(self._out_names):
            raise BackendError(
                f"mnn returned {len(result)} output(s), the model has {len(self._out_names)}: "
                f"{self._why_no_outputs(feeds)}"
            )
        for name, dtype in self._widen.items():
            result[name] = result[name].astype(dtype, copy=False)
        return result

    def _why_no_outputs(self, feeds: dict[str, np.ndarray]) -> str:
        """What MNN prints when it computes no output (a shape it cannot infer, a kernel it lacks): the forward
        once more with its C output captured. Only on that failure, so the hot path never pays for a capture."""
        const, nchw = self._const, self._nchw
        with _captured_output() as log, _EXECUTOR_LOCK, contextlib.suppress(Exception):
            args = [const(np.ascontiguousarray(feeds[n]), feeds[n].shape, nchw, dt) for n, dt in self._in]
            self._module.forward(args)
        shapes = {n: list(np.shape(a)) for n, a in feeds.items()}
        said = _engine_said(log[0] if log else "")
        return f"at input shapes {shapes}" + (f"; MNN said: {said}" if said else "; MNN gave no reason")

    def close(self) -> None:
        super().close()
        self._module = None
        self._runtime = None


class MnnBackend(Backend):
    name = "mnn"
    in_memory = True
    precisions = (*_PRECISIONS, "int8")
    calibrates_itself = True  # mnn:int8 is MNN's own quantiser on the compile's calibration samples (_mnn_quant.py)
    # MNN's int8 (symmetric per-tensor int8 activations, symmetric per-channel int8 weights, convolutions in int8).
    # The quantiser quantises the model itself; this table only lets luodi's sensitivity ranking simulate it.
    int8_policy = {
        **VENDOR_W8A8,
        "activations": {"dtype": "int8", "symmetric": True},
        "rounding": "half_away_from_zero",
        "ops": ["Conv", "Gemm", "MatMul"],
        "notes": "luodi's MSE ranges in MNN's converter (or MNN's quantiser), approximated for the sensitivity ranking",
    }
    compile_options = {
        "ranges": Option(
            str,
            "mnn:int8: luodi (the default: luodi's MSE activation ranges, measured on MNN's float model and written "
            "into MNN's compression-params file for its converter) or mnn (MNN's own quantiser, with method and "
            "weight_method; setting either chooses it)",
        ),
        "activations": Option(
            str,
            "mnn:int8 with ranges=luodi: symmetric (the default: -127..127 about zero, as MNN's own quantiser) or "
            "asymmetric (a zero point, 255 steps over each tensor's range; see docs/performance.md)",
        ),
        "bias_correction": Option(
            (bool, str),
            "mnn:int8 with ranges=luodi: correct each Conv's and Gemm's bias for the mean output error of its int8 "
            "weights, measured over the calibration samples (default true)",
        ),
        "method": Option(str, f"mnn:int8's activation calibration, one of MNN's {', '.join(FEATURE_METHODS)} (KL)"),
        "weight_method": Option(str, f"mnn:int8's weight quantisation, one of {', '.join(WEIGHT_METHODS)} (MAX_ABS)"),
    }
    module = "MNN"
    extra = "mnn"
    crash_prone = True  # MNN trusts its flatbuffer: one changed byte in model.mnn can segfault the loader
    precision_note = "bf16 is not offered: MNN's x86 CPU backend runs Low_BF16 in fp32"

    def available(self) -> Availability:
        try:
            _import_mnn()
        except ImportError as exc:
            return Availability(
                False,
                reason=f"MNN is not installed ({exc.msg})",
                install=self.install_hint(),
                precisions=self.precisions,
            )
        import MNN

        version = MNN.version() if hasattr(MNN, "version") else ""
        return Availability(True, devices=self.devices, precisions=self.precisions, version=str(version))

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        if options.device != "cpu":
            raise BackendUnavailableError(f"{self.name} runs on device 'cpu' only here, not '{options.device}'")
        fp16_weights, mode = _PRECISIONS.get(options.precision, (False, "high"))
        inputs, outputs = options.io(model)
        trial = primary_shapes(inputs, options)  # the representative shapes; free dims at 1 without them
        opts = {
            "precision_mode": mode,
            "fp16_weights": fp16_weights,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "trial_shapes": {name: list(shape) for name, shape in trial.items()},
        }
        calibrate = None
        if options.precision == "int8":
            calibrate = self._calibration(inputs, options)
            # MNN quantises the first Conv's input symmetrically per tensor: pixels would keep seven bits of eight
            unfolded = unfold_input_normalization(model, dict(options.input_normalization or {}))
            if unfolded is not model:
                model, opts["normalization_unfolded"] = unfolded, True
            if _ranges(options.extra) == "mnn":
                opts["quantiser"] = {
                    "method": options.extra.get("method", DEFAULT_METHOD),
                    "weight_method": options.extra.get("weight_method", "MAX_ABS"),
                    "samples": len(options.calibration),
                }
            else:
                opts["quantiser"] = {
                    "ranges": "luodi",
                    "method": "mse",
                    "activations": _activations(options.extra),
                    "samples": len(options.calibration),
                }
                if _bias_correction(options.extra):
                    model, fixed = _corrected_biases(model, inputs[0].name, options.calibration)
                    opts["quantiser"]["bias_corrected_layers"] = fixed
        quantised: dict[str, Any] = {}
        data = _mnn_convert.convert(model, {**opts, "representative": bool(options.shapes)}, calibrate, quantised)
        if "layers" in quantised:
            opts["quantiser"]["layers"] = quantised["layers"]
        return Artifact(self.name, options.precision, {MODEL_FILE: data}, opts)

    @staticmethod
    def _calibration(inputs: list[TensorSpec], options: CompileOptions) -> Callable[[Path], dict[str, Any]]:
        """What writes the calibration samples where MNN's quantiser reads them, checked before any conversion."""
        if options.int8_io:
            raise NotApplicableError(
                "mnn:int8 keeps float inputs and outputs: MNN quantises inside the model (its quantised model's "
                "inputs are float), so --int8-io has no integer boundary to give it; drop --int8-io or this target"
            )
        samples = [dict(f) for f in options.calibration or ()]
        if not samples:
            raise CompileError("mnn:int8 needs calibration data: pass calibration= (CLI: --calibration)")
        if _ranges(options.extra) == "luodi":
            stacked_samples(inputs, samples)  # refused before any conversion, as below
            symmetric = _activations(options.extra) == "symmetric"
            return lambda workdir: write_samples(workdir, inputs, samples, symmetric)
        feature = options.extra.get("method", DEFAULT_METHOD)
        weight = options.extra.get("weight_method", "MAX_ABS")
        check_methods(feature, weight)
        pixels = bool(inputs) and (options.input_normalization or {}).get("input") == inputs[0].name
        return lambda workdir: write_calibration(workdir, inputs, samples, pixels, feature, weight)

    def check_compile_options(self, extra: Mapping[str, Any], precision: str) -> None:
        super().check_compile_options(extra, precision)
        if _ranges(extra) == "luodi":
            _activations(extra)
            _bias_correction(extra)
        else:
            check_methods(extra.get("method", DEFAULT_METHOD), extra.get("weight_method", "MAX_ABS"))

    def validate(self, artifact: Artifact) -> None:
        data = artifact.files.get(MODEL_FILE)
        if data is None:
            raise ModelError(f"{artifact.target} artifact has no {MODEL_FILE}")
        _check_flatbuffer(data, artifact.target)

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        if options.device != "cpu":
            raise BackendUnavailableError(f"{self.name} has no device '{options.device}' here; choose 'cpu'")
        data = artifact.files.get(MODEL_FILE)
        if data is None:
            raise ModelError(f"{artifact.target} artifact has no {MODEL_FILE}")
        self.validate(artifact)
        inputs = [TensorSpec.from_dict(d) for d in artifact.options.get("inputs", [])]
        outputs = [TensorSpec.from_dict(d) for d in artifact.options.get("outputs", [])]
        if not inputs or not outputs:
            raise ModelError(f"{artifact.target} artifact does not record its input and output names")
        mode = artifact.options.get("precision_mode", "high")
        threads = options.threads or min(4, os.cpu_count() or 1)
        _, nn, _ = _import_mnn()
        with contextlib.ExitStack() as stack:
            if artifact.in_memory or hasattr(os, "memfd_create"):
                # Decrypted files never touch disk; the others neither where memory files exist, so that a load
                # that dies (a malformed file the probe passed) leaves no temporary file behind.
                path = stack.enter_context(memory_file(data, MODEL_FILE))
            else:
                path = stack.enter_context(_temporary_file(data))
            with _captured_output() as log, _EXECUTOR_LOCK:
                try:
                    runtime = nn.create_runtime_manager(({"backend": "CPU", "precision": mode, "numThread": threads},))
                    module = nn.load_module_from_file(
                        path,
                        [s.name for s in inputs],
                        [s.name for s in outputs],
                        runtime_manager=runtime,
                        shape_mutable=True,
                    )
                except Exception as exc:
                    module, error = None, exc
                else:
                    error = None
        if module is None:
            detail = (log[0].strip().splitlines() or [""])[-1] if log else ""
            raise CompileError(f"mnn could not load {artifact.target}: {error} {detail}".strip())
        return MnnEngine(module, runtime, inputs, outputs)


def _activations(extra: Mapping[str, Any]) -> str:
    value = extra.get("activations", "symmetric")
    if value not in ("asymmetric", "symmetric"):
        raise CompileError(f"mnn activations must be asymmetric or symmetric, not '{value}'")
    return str(value)


def _bias_correction(extra: Mapping[str, Any]) -> bool:
    value = extra.get("bias_correction", True)
    if isinstance(value, str):  # from the command line: --option mnn.bias_correction=false
        if value.lower() not in ("true", "false"):
            raise CompileError(f"mnn bias_correction must be true or false, not '{value}'")
        return value.lower() == "true"
    return bool(value)


def _corrected_biases(model: Any, name: str, calibration: Any) -> tuple[Any, int]:
    """``model`` with each Conv's and Gemm's bias less the mean output error of its weights as MNN's converter rounds
    them with luodi's scales (symmetric per channel, max-abs), measured on the calibration samples with onnxruntime
    (luodi.backends._onnx_ptq, as for rknn); and how many layers were corrected."""
    import onnx

    feeds = [{name: np.asarray(f[name], np.float32)} for f in calibration]
    data, fixed = correct_biases(model.SerializeToString(), feeds, rounded_symmetric)
    return (onnx.ModelProto.FromString(data), fixed) if fixed else (model, 0)


def _ranges(extra: Mapping[str, Any]) -> str:
    """mnn:int8's route (_mnn_quant.py): ``ranges``, else "mnn" when MNN's quantiser's own options are set, else
    luodi's ranges; a CompileError for an option of the other route."""
    given = extra.get("ranges")
    if given is None:
        given = "mnn" if {"method", "weight_method"} & set(extra) else DEFAULT_RANGES
    if given not in RANGES:
        raise CompileError(f"mnn:int8 ranges {given!r} is not one of {', '.join(RANGES)}")
    if given == "luodi" and {"method", "weight_method"} & set(extra):
        raise CompileError(
            "mnn:int8: method and weight_method are options of MNN's quantiser (ranges=mnn), not of ranges=luodi"
        )
    if given == "mnn" and {"activations", "bias_correction"} & set(extra):
        raise CompileError("mnn:int8: activations and bias_correction are options of ranges=luodi, not of ranges=mnn")
    return str(given)


_NOISE = re.compile(r"The device supports:|^\s*$")


def _engine_said(log: str, lines: int = 2) -> str:
    """The last lines MNN printed (its errors go to stdout with printf), without the CPU feature banner."""
    kept = [ln.strip() for ln in log.splitlines() if not _NOISE.search(ln)]
    return " | ".join(kept[-lines:])[:400]
