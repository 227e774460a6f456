"""MNN (Alibaba's mobile inference engine): ONNX -> .mnn at compile time, the Module API at run time.

Compile converts the canonical graph with MNN's converter (the ``_tools`` C extension, called
directly: the ``mnnconvert`` command and ``MNN.tools`` send usage telemetry and pip-install a
logging SDK at import time, so this module never imports them), then loads the result and runs it
once on ones and, if that fails, on zeros (zeros are no valid integer divisor or Resize scale). An
operator MNN cannot handle is an ``UnsupportedOpError`` at compile time, naming the op and node when
the converter names it ("These Op Not Support: ONNX::Hardmax"). Conversion and that first run
happen in a child process: MNN 3.6.1 dies of SIGSEGV/SIGFPE/SIGABRT on many graphs it cannot
handle (about 50 of the first 1300 ONNX node test cases, converter and kernels alike; OneHot
allocated until the OOM killer came), and a crash must not take the caller down. The child costs
about 0.2-0.4 s per compile and runs with its address space capped at half the machine's memory.
Pooling nodes without ``strides`` get the ONNX default written out first (MNN reads it as 0, SIGFPE).

Precisions, as measured with the MNN 3.6.1 x86-64 wheel on an AVX-512 (incl. AVX512_BF16) CPU:

- ``fp32``: runtime precision ``"high"``; the same as onnxruntime to about 1e-5 on logits.
- ``fp16``: weights stored as fp16 in the .mnn file (converter ``--fp16``, half the size) and
  runtime precision ``"low"``. On x86 the wheel computes in fp32 whatever the mode ("low" and
  ``Low_BF16`` give results bit-identical to "high" here; it reports ``fp16:0``), so the loss is
  the weight rounding alone (about 6e-2 on EfficientNet-Lite0 logits, within the fp16 tolerance).
  On ARMv8.2 devices "low" also computes in fp16.
- ``bf16`` is not offered: this wheel's CPU backend has no bf16 kernels, ``Low_BF16`` runs fp32.

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
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import onnx_io
from ..errors import BackendError, BackendUnavailableError, CompileError, InputError, ModelError, UnsupportedOpError
from ..tensor import TensorSpec, specs_from_onnx
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, memory_file
from .shapes import primary_shapes

MODEL_FILE = "model.mnn"
# precision -> (converter stores fp16 weights, runtime precision mode)
_PRECISIONS: dict[str, tuple[bool, str]] = {"fp32": (False, "high"), "fp16": (True, "low")}
_NOT_SUPPORTED = re.compile(r"These Op Not Support:\s*(.*)")
_POOLS = {"MaxPool", "AveragePool", "LpPool"}
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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
    int8_unsupported = (
        "MNN's int8 calibration is its mnnquant tool, which luodi never runs (it pip-installs a telemetry SDK and "
        "sends data); weight-only int8 (--weightQuantBits) computes in float, so it is not an int8 target"
    )
    precisions = tuple(_PRECISIONS)
    module = "MNN"
    extra = "mnn"
    crash_prone = True  # MNN trusts its flatbuffer: one changed byte in model.mnn can segfault the loader

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

    def compile(self, model: Any, options: CompileOptions) -> Artifact:
        self.require()
        if options.precision not in _PRECISIONS:
            raise CompileError(
                f"{self.name} has no precision '{options.precision}'; choose one of {list(self.precisions)} "
                "(bf16 is not offered: MNN's x86 CPU backend runs Low_BF16 in fp32)"
            )
        if options.device != "cpu":
            raise BackendUnavailableError(f"{self.name} runs on device 'cpu' only here, not '{options.device}'")
        fp16_weights, mode = _PRECISIONS[options.precision]
        # the compiler's specs, computed once; the graph's own when a caller gives none
        inputs, outputs = (
            (list(options.inputs), list(options.outputs))
            if options.inputs and options.outputs
            else specs_from_onnx(model)
        )
        trial = primary_shapes(inputs, options)  # the representative shapes; free dims at 1 without them
        opts = {
            "precision_mode": mode,
            "fp16_weights": fp16_weights,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "trial_shapes": {name: list(shape) for name, shape in trial.items()},
        }
        job = {**opts, "representative": bool(options.shapes)}
        with tempfile.TemporaryDirectory(prefix="luodi-mnn-") as tmp:
            onnx_io.save(_legalised(model), Path(tmp, "model.onnx"))  # + model.onnx.data over 2 GB
            Path(tmp, "job.json").write_text(json.dumps(job))
            data = _convert_and_probe_in_child(tmp, model)
        return Artifact(self.name, options.precision, {MODEL_FILE: data}, opts)

    def validate(self, artifact: Artifact) -> None:
        data = artifact.files.get(MODEL_FILE)
        if data is None:
            raise ModelError(f"{artifact.target} artifact has no {MODEL_FILE}")
        _check_flatbuffer(data, artifact.target)

    def load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        self.require()
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


_CHILD_TIMEOUT_S = 300
_STAGES = {
    "convert": "converting the ONNX graph",
    "load": "loading the converted model",
    "run": "running the converted model once on zeros/ones",
}


def _convert_and_probe_in_child(workdir: str, model: Any) -> bytes:
    """Convert ``workdir/model.onnx`` and run it once, in a child process; the .mnn bytes.

    MNN dies of SIGSEGV/SIGFPE/SIGABRT (or allocates until the OOM killer comes) on a fair number of
    graphs it cannot handle, in the converter and in its kernels alike; in a child process that is
    an UnsupportedOpError for the caller instead of the end of the caller's process.
    """
    import luodi

    env = dict(os.environ)
    src_root = str(Path(luodi.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    code = "from luodi.backends.mnn import _child_main; _child_main()"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, workdir],
            capture_output=True,
            env=env,
            cwd=workdir,  # the converter drops scratch files (.__convert_external_data.bin) in the cwd
            timeout=_CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CompileError(f"mnn did not finish converting the model within {_CHILD_TIMEOUT_S} s") from None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    _raise_unsupported(text, model)
    stage_file = Path(workdir, "stage")
    stage = stage_file.read_text() if stage_file.exists() else "convert"
    doing = _STAGES.get(stage, stage)
    ops = sorted({n.op_type for n in model.graph.node})
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        hint = " (probably out of memory)" if sig == "SIGKILL" or "bad_alloc" in text else ""
        raise UnsupportedOpError(
            f"mnn crashed with {sig}{hint} while {doing}; the model's operators are {ops}; "
            "MNN cannot handle one of them here: try another target"
        )
    result_file = Path(workdir, "result.json")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if result.get("status") == "run-failed":
        shapes = json.loads(Path(workdir, "job.json").read_text()).get("trial_shapes", {})
        free = any(not isinstance(d, int) for s in specs_from_onnx(model)[0] for d in s.shape[1:])  # beyond batch
        hint = (
            "; the model has free dimensions: give shapes it really runs at (--input-shape NAME=1x3x224x224)"
            if free and not result.get("representative")
            else "; try another target"
        )
        raise UnsupportedOpError(
            f"mnn converted the model but cannot run it at input shapes {shapes} (on ones nor zeros): "
            f"{result.get('error')}; the model's operators are {ops}{hint}"
        )
    if proc.returncode != 0 or result.get("status") != "ok":
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
        detail = result.get("error") or tail or f"exit status {proc.returncode}"
        raise CompileError(f"mnn failed while {doing}: {detail}")
    return Path(workdir, MODEL_FILE).read_bytes()


def _child_main() -> None:
    """The child side of _convert_and_probe_in_child: argv[1] is the work folder."""
    work = Path(sys.argv[1])
    from .probe import limit_memory  # some graphs make MNN allocate without bound: a cap ends the child at once

    limit_memory()
    stage, result = work / "stage", work / "result.json"
    opts = json.loads((work / "job.json").read_text())
    src, dst = str(work / "model.onnx"), str(work / MODEL_FILE)
    stage.write_text("convert")
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", src, "--MNNModel", dst, "--bizCode", "luodi"]
    if opts["fp16_weights"]:
        argv.append("--fp16")
    import _tools  # MNN's converter extension; never MNN.tools (telemetry)

    try:
        _tools.mnnconvert(argv)
    except Exception as exc:  # the extension raises bare exceptions
        result.write_text(json.dumps({"status": "convert-failed", "error": str(exc)}))
        return
    sys.stdout.flush()
    if not os.path.exists(dst):
        result.write_text(json.dumps({"status": "convert-failed", "error": "the converter wrote no model"}))
        return
    stage.write_text("load")
    backend = MnnBackend()
    artifact = Artifact(backend.name, "probe", {MODEL_FILE: Path(dst).read_bytes()}, opts)
    engine = backend.load(artifact, LoadOptions(threads=1))
    stage.write_text("run")
    error = None
    shapes = {name: tuple(shape) for name, shape in opts["trial_shapes"].items()}
    for fill in (1, 0):  # ones first: zeros are no valid integer divisor or "scales"; then zeros
        feeds = {s.name: np.full(shapes[s.name], fill, dtype=s.np_dtype) for s in engine.inputs}
        with _captured_output() as log:
            try:
                engine.run(feeds)
            except BackendError as exc:
                error = str(exc)
            else:
                error = None
        if error is None:
            break
        said = _engine_said(log[0] if log else "")
        if said and "MNN said" not in error:
            error = f"{error}; MNN said: {said}"
    engine.close()
    status = {"status": "ok"} if error is None else {"status": "run-failed", "error": error}
    status["representative"] = bool(opts.get("representative"))
    result.write_text(json.dumps(status))


_NOISE = re.compile(r"The device supports:|^\s*$")


def _engine_said(log: str, lines: int = 2) -> str:
    """The last lines MNN printed (its errors go to stdout with printf), without the CPU feature banner."""
    kept = [ln.strip() for ln in log.splitlines() if not _NOISE.search(ln)]
    return " | ".join(kept[-lines:])[:400]


def _legalised(model: Any) -> Any:
    """``model`` with the attribute defaults MNN's converter gets wrong written out explicitly.

    MNN 3.6.1 converts a MaxPool/AveragePool/LpPool without ``strides`` to stride 0 (ONNX's default
    is 1), and the CPU kernel then dies of SIGFPE, a division by zero that takes the process down.
    """
    from onnx import helper

    missing = [n for n in model.graph.node if n.op_type in _POOLS and not any(a.name == "strides" for a in n.attribute)]
    if not missing:
        return model
    fixed = type(model)()
    fixed.CopyFrom(model)
    for node in fixed.graph.node:
        if node.op_type in _POOLS and not any(a.name == "strides" for a in node.attribute):
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
            node.attribute.append(helper.make_attribute("strides", [1] * len(kernel)))
    return fixed


def _raise_unsupported(text: str, model: Any) -> None:
    """Turn the converter's "These Op Not Support: ONNX::Hardmax ..." line into UnsupportedOpError."""
    m = _NOT_SUPPORTED.search(text)
    if not m:
        return
    ops = [tok.split("::")[-1] for tok in m.group(1).split() if tok.strip(",")]
    ops = [o.strip(",") for o in ops]
    where = []
    for op in ops:
        nodes = [n.name or f"#{i}" for i, n in enumerate(model.graph.node) if n.op_type == op]
        where.append(f"{op} at node(s) {', '.join(repr(n) for n in nodes[:5])}" if nodes else op)
    raise UnsupportedOpError(
        f"mnn cannot run operator(s) {'; '.join(where)}; try another target or replace the operator before export"
    )
