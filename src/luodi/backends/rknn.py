"""Rockchip RKNN NPUs (RK3588 and its family): ONNX -> .rknn with rknn-toolkit2, run on its x86 simulator or a board.

rknn-toolkit2 pins numpy<=1.26, onnx<=1.18 and a torch that pulls CUDA, so it lives in a toolchain environment of
its own (``luodi toolchain install rknn``, luodi.toolchain) and runs in a bare worker process
(luodi.backends._rknn_child): the graph, calibration samples and inputs go in as arrays, the .rknn and outputs come
back; a crash of the toolkit is a BackendError, never the caller's.

Targets: ``rknn:int8`` (the toolkit's own w8a8 quantisation, calibrated on the compile's calibration data: int8
weights and activations, the model's float inputs and outputs made int8 "for performance") and ``rknn:fp16``
(no quantisation: the NPU's float16, the control that shows what int8 costs). Compile option ``platform``
(rk3588 by default; any the toolkit lists).

What luodi adds to the toolkit's int8 (luodi.backends._onnx_ptq, on the float graph with onnxruntime over the same
calibration samples; EfficientNet-Lite0: 86.98% top-1 agreement with fp32 on the toolkit's own, 94.08% with both):

- bias correction (option ``bias_correction``, true by default): the graph the toolkit calibrates has each Conv's
  and Gemm's bias less the mean output error of its weights as the toolkit rounds them (per output channel,
  asymmetric, 255 steps: measured, its config files do not expose weights);
- activation ranges (option ``ranges``: ``luodi`` by default, ``toolkit`` for its own): int8 is built in the
  toolkit's two hybrid-quantisation steps; between them each intermediate activation's ``min``/``max`` in its
  ``model.quantization.cfg`` is replaced by the MSE-optimal range on that tensor's histogram (step 2 derives scale
  and zero point from them again and refuses an edited scale). The model's inputs and outputs keep the toolkit's
  ranges (their int8 I/O specs). The record keeps ``ranges``, ``bias_correction`` and how many tensors and layers
  each changed (``luodi_ranges``, ``corrected_layers``).

Shapes are static: the model is built at the compile's primary shapes; a batch larger than the one built runs one
sample at a time.

What runs where:

- The stored artifact is ``model.rknn``, the file that goes to the board, plus what rebuilds the same model on the
  simulator: for int8 the toolkit's hybrid-quantisation files (``model.model``, ``model.data``: the graph and
  float weights; ``model.quantization.cfg``: every tensor's scale and zero point), for fp16 the ONNX graph.
- The toolkit's simulator cannot run a .rknn loaded back from a file, only the model of the session that built it.
  So the compile verifies in the building session (the session is kept, idle, for the next load of the same file
  in this process), and ``Session(pkg, backend="rknn", device="simulator")`` rebuilds the model from those files in
  a new toolchain session (seconds to a minute; for accuracy work, not for speed: it is a CPU simulation).
- ``device="npu"`` on an aarch64 board with rknn-toolkit-lite2 (``pip install rknn-toolkit-lite2``) loads the
  .rknn with ``RKNNLite`` in a worker process of the board's own Python (not bare: luodi is installed there).

int8 I/O: the device reads and writes int8 with the scale and zero point the toolkit chose (its config's
``NAME_int8`` entries); with ``int8_io`` the target's io specs carry them, and Session quantises at the boundary.
The simulator crashes when given int8 inputs with ``inputs_pass_through``, so on the simulator integer inputs are
dequantised exactly (the toolkit quantises them back to the same integers) and float outputs quantised with the
output's parameters; the NPU takes the integers as they are (pass-through).
"""

from __future__ import annotations

import atexit
import hashlib
import platform as _platform
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import BackendError, CompileError, InputError, ShapeError
from ..tensor import TensorSpec
from ._int8 import VENDOR_W8A8
from ._onnx_ptq import correct_biases, given_ranges, mse_ranges
from ._outputs import concat_outputs, device_outputs, join_outputs
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions
from .contract import Option
from .shapes import device_specs, fit_sample, primary_shapes

TOOLCHAIN = "rknn"
FACTORY = "luodi.backends._rknn_child:load"
INT8_FILES = ("model.model", "model.data", "model.quantization.cfg")
DEFAULT_PLATFORM = "rk3588"
# rknn-toolkit2 2.5.0's list (its config() documentation); checked against the installed toolkit at compile time.
PLATFORMS = (
    "rv1103",
    "rv1103b",
    "rv1106",
    "rv1106b",
    "rv1126b",
    "rk2118",
    "rk3562",
    "rk3566",
    "rk3568",
    "rk3576",
    "rk3588",
)
RANGES = ("luodi", "toolkit")
_CORE_MASKS = ("auto", "0", "1", "2", "0_1", "0_1_2")


def _on_board() -> bool:
    return _platform.machine().lower() in ("aarch64", "arm64")


def _lite_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rknn-toolkit-lite2")
    except PackageNotFoundError:
        return None


class RknnBackend(Backend):
    name = "rknn"
    precisions = ("int8", "fp16")
    devices = ("simulator", "npu")
    calibrates_itself = True
    static_shapes = True
    # The toolkit quantises the model itself; this table (its w8a8: int8 asymmetric per-tensor activations, int8
    # per-channel weights) only lets luodi's sensitivity ranking simulate it, to choose layers for hybrid quantisation.
    int8_policy = {
        **VENDOR_W8A8,
        "rounding": "half_to_even",
        "notes": "rknn-toolkit2 w8a8, approximated for the sensitivity ranking only",
    }
    precision_note = "int8: the toolkit's w8a8; fp16: the NPU's float16, the control"
    compile_options = {
        "platform": Option(str, f"the Rockchip NPU to build for, one of {', '.join(PLATFORMS)} (default rk3588)"),
        "algorithm": Option(str, "the toolkit's quantized_algorithm: normal (default), mmse or kl_divergence"),
        "ranges": Option(
            str,
            "int8 activation ranges: luodi (default: each intermediate tensor's MSE-optimal range on its histogram "
            "over the calibration samples, written over the toolkit's before it quantises) or toolkit (its own)",
        ),
        "bias_correction": Option(
            (bool, str),
            "int8: correct each Conv's and Gemm's bias for the mean output error of the toolkit's rounded weights, "
            "measured over the calibration samples (default true; false: the toolkit's weights alone)",
        ),
        "float_tensors": Option(
            list,
            "ONNX tensor names whose layers stay in float16 (the toolkit's hybrid quantisation); the compiler's "
            "--accuracy-budget fallback chooses them from luodi's sensitivity ranking",
        ),
    }
    load_options = {
        "core_mask": Option(str, f"on the NPU (RK3588): which cores run the model, one of {', '.join(_CORE_MASKS)}"),
        "pass_through": Option(
            bool,
            "on the NPU, with --int8-io: hand int8 inputs to the runtime as they are (inputs_pass_through, NHWC) "
            "instead of dequantising them exactly for it to quantise again; untested without a board",
        ),
    }

    def available(self) -> Availability:
        from ..toolchain import SPECS, status

        st = status(TOOLCHAIN)
        lite = _lite_version() if _on_board() else None
        devices = (("simulator",) if st.ok else ()) + (("npu",) if lite else ())
        if not devices:
            why = {"missing": "is not installed"}.get(st.state, f"is {st.state} ({st.detail})")
            return Availability(
                False,
                reason=f"the rknn toolchain (rknn-toolkit2 in its own environment) {why}",
                install=f"luodi toolchain install {TOOLCHAIN}"
                + (" (or, on the board: pip install rknn-toolkit-lite2)" if _on_board() else ""),
                precisions=self.precisions,
            )
        pinned = next((r.split("==")[1] for r in SPECS[TOOLCHAIN].no_deps if r.startswith("rknn-toolkit2==")), "")
        return Availability(True, devices=devices, precisions=self.precisions, version=lite or pinned)

    # -- compile --------------------------------------------------------------------------------------------------
    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        platform = options.extra.get("platform", DEFAULT_PLATFORM).lower()
        if platform not in PLATFORMS:
            raise CompileError(f"rknn has no platform '{platform}'; choose one of {', '.join(PLATFORMS)}")
        algorithm = options.extra.get("algorithm", "normal")
        if algorithm not in ("normal", "mmse", "kl_divergence"):
            raise CompileError(f"rknn algorithm must be normal, mmse or kl_divergence, not '{algorithm}'")
        ranges = options.extra.get("ranges", "luodi")
        if ranges not in RANGES:
            raise CompileError(f"rknn ranges must be {' or '.join(RANGES)}, not '{ranges}'")
        bias = options.extra.get("bias_correction", True)
        if isinstance(bias, str):  # from the command line: --option rknn.bias_correction=false
            if bias.lower() not in ("true", "false"):
                raise CompileError(f"rknn bias_correction must be true or false, not '{bias}'")
            bias = bias.lower() == "true"
        inputs, outputs = options.io(model)
        if any(s.np_dtype.kind != "f" for s in inputs):
            bad = [f"{s.name} ({s.dtype})" for s in inputs if s.np_dtype.kind != "f"]
            raise CompileError(f"rknn takes float inputs only (the NPU quantises them); this model has {bad}")
        shapes = primary_shapes(inputs, options)
        data = options.model_bytes if options.model_bytes is not None else model.SerializeToString()
        # int8: an output that is a Concat of unlike ranges (a detector's boxes and scores) leaves the device as its
        # parts, each with its own scale, joined in float on the host (luodi.backends._outputs)
        joins = concat_outputs(model) if options.precision == "int8" else {}
        args = _session_args(platform, options.precision, inputs, outputs, shapes, algorithm, joins)
        arrays: dict[str, np.ndarray] = {"model": np.frombuffer(data, np.uint8)}
        if options.precision == "int8":
            calibration = list(options.calibration or ())
            if not calibration:
                raise CompileError("rknn:int8 needs calibration data: pass calibration= (CLI: --calibration)")
            for s in inputs:
                arrays[f"calib:{s.name}"] = np.stack(
                    [fit_sample(np.asarray(f[s.name], np.float32), shapes[s.name], s.name, "rknn") for f in calibration]
                )
            args["float_tensors"] = [str(t) for t in options.extra.get("float_tensors", [])]
        worker = _start_worker("rknn compile", {"platform": platform, "device": "simulator"})
        try:
            trained = dict(options.int8_ranges or {}) if options.precision == "int8" else {}
            if options.precision == "int8" and (ranges == "luodi" or bias or trained):
                header, out = _build_luodi(worker, args, arrays, data, ranges == "luodi", bias, trained)
            else:
                header, out = worker.call("build", args, arrays)
        except BaseException:
            worker.close()
            raise
        files = {name.split(":", 1)[1]: out[name].tobytes() for name in out if name.startswith("file:")}
        if options.precision == "fp16":
            files["model.onnx"] = data  # what the simulator rebuilds from (stored once: the package's own graph)
        record = {
            "platform": platform,
            "shapes": {n: list(shapes[n]) for n in args["inputs"]},
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "toolkit": worker.info.get("toolkit", ""),
        }
        if options.precision == "int8":
            params = header.get("io") or {}
            record["device_io"] = {n: {"scale": p[0], "zero_point": p[1], "dtype": p[2]} for n, p in params.items()}
            record["algorithm"] = algorithm
            record["ranges"] = ranges
            record["luodi_ranges"] = int(header.get("ranges_set") or 0)  # tensors given luodi's range
            record["trained_ranges"] = int(header.get("trained_ranges") or 0)  # ... of them QAT's
            record["bias_correction"] = bias
            record["corrected_layers"] = int(header.get("corrected_layers") or 0)
            record["int8_io"] = options.int8_io  # the engine then reads and writes the device's integers
            record["float_layers"] = list(header.get("float_layers") or [])  # the toolkit's layers kept in float16
            record["joins"] = joins
        artifact = Artifact(self.name, options.precision, files, record)
        if options.int8_io and options.precision == "int8":
            artifact.io = device_specs(artifact.options)
        _SESSIONS.put(_key(artifact), worker)  # the building session simulates: the next load here adopts it
        return artifact

    def layer_errors(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """The toolkit's own layer-wise table (``accuracy_analysis`` on the simulator, in the session holding the
        built model): per tensor of its graph, the cosine of its quantised simulation against its float run, with
        the error accumulated from the input (``cosine``) and that layer's alone (``single_cosine``)."""
        with RknnEngine(artifact, "simulator", "auto") as engine:
            sim = engine._sim_in  # integers of an int8-I/O target, dequantised exactly as _run does
            feeds = {n: sim[n].dequantise(a) if n in sim and a.dtype.kind in "iu" else a for n, a in feeds.items()}
            return parse_error_analysis(engine.layerwise({n: np.asarray(a, np.float32) for n, a in feeds.items()}))

    # -- load -----------------------------------------------------------------------------------------------------
    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        device = options.device
        if device == "cpu":  # luodi's default device: the simulator on a host, the NPU on a board that has one
            device = "npu" if _on_board() and _lite_version() else "simulator"
        if device not in self.devices:
            raise InputError(f"rknn runs on device 'simulator' (x86, rknn-toolkit2) or 'npu' (a board), not '{device}'")
        avail = self.available()
        if device not in avail.devices:
            need = "rknn-toolkit-lite2 on an aarch64 board" if device == "npu" else "luodi toolchain install rknn"
            raise BackendError(f"rknn device '{device}' is not available here: it needs {need}")
        extra = options.extra
        return RknnEngine(artifact, device, str(extra.get("core_mask", "auto")), bool(extra.get("pass_through")))


def _build_luodi(
    worker: Any,
    args: dict[str, Any],
    arrays: dict[str, np.ndarray],
    data: bytes,
    ranges: bool,
    bias: bool,
    trained: dict[str, tuple[float, float]] | None = None,
) -> tuple[dict, dict]:
    """int8 with what luodi adds (luodi.backends._onnx_ptq), on the float graph over the calibration samples: the
    graph the toolkit calibrates has its biases corrected for the toolkit's weight rounding (``bias``); between the
    toolkit's calibration (step 1) and its quantisation (step 2), each intermediate activation's range is replaced
    by its MSE-optimal one (``ranges``), or by the one QAT trained for it (``trained``: CompileOptions.int8_ranges).
    The model's inputs and outputs keep the toolkit's ranges (their int8 I/O)."""
    names = args["inputs"]
    stacks = [arrays[f"calib:{n}"] for n in names]
    feeds = [{n: stack[i] for n, stack in zip(names, stacks)} for i in range(len(stacks[0]))]
    corrected = 0
    if bias:
        data, corrected = correct_biases(data, feeds)
        arrays = {**arrays, "model": np.frombuffer(data, np.uint8)}
    qat: dict[str, tuple[float, float]] = {}
    if not ranges and not trained:
        header, out = worker.call("build", args, arrays)
    else:
        found = worker.call("calibrate", args, arrays)[0]["ranges"]
        calibrated = {t: (float(v[0]), float(v[1])) for t, v in found.items()}
        chosen = mse_ranges(data, feeds, calibrated) if ranges else {}
        qat = given_ranges(data, calibrated, trained or {})
        chosen.update(qat)
        header, out = worker.call(
            "build", {**args, "calibrated": True, "ranges": {t: [lo, hi] for t, (lo, hi) in chosen.items()}}, {}
        )
    header["corrected_layers"] = corrected
    header["trained_ranges"] = len(qat)
    return header, out


def parse_error_analysis(text: str) -> list[dict[str, Any]]:
    """Rows of the toolkit's error_analysis.txt: ``[Op] tensor  cos | euc  cos | euc`` (entire, then single layer);
    a layer the toolkit printed without figures is left out."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("[") or "]" not in line:
            continue
        op, rest = line[1:].split("]", 1)
        parts = rest.replace("|", " ").split()
        if len(parts) < 5:
            continue
        try:
            entire, single = float(parts[1]), float(parts[3])
        except ValueError:
            continue
        rows.append({"tensor": parts[0], "op": op, "cosine": entire, "single_cosine": single})
    return rows


def _session_args(
    platform: str,
    precision: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    shapes: Any,
    algorithm: str,
    joins: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fixed = {s.name: [int(d) for d in shapes[s.name]] for s in inputs}
    four_d = all(len(v) == 4 for v in fixed.values())
    return {
        "precision": precision,
        "inputs": [s.name for s in inputs],
        "outputs": device_outputs([s.name for s in outputs], joins or {}),
        "shapes": fixed,
        # mean/std identity per input channel (NCHW): luodi's pipeline does the pre-processing
        "channels": [fixed[s.name][1] for s in inputs] if four_d else [],
        "algorithm": algorithm if precision == "int8" else "",
    }


def _key(artifact: Artifact) -> str:
    return hashlib.sha256(artifact.file("model.rknn")).hexdigest()


class _Sessions:
    """Toolchain sessions kept idle by the .rknn they built or rebuilt: the simulator runs only in such a session,
    and building one again costs seconds to minutes. At most ``keep`` idle ones, the oldest closed first; all are
    closed when the process exits."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.idle: OrderedDict[str, Any] = OrderedDict()
        atexit.register(self.clear)

    def put(self, key: str, worker: Any) -> None:
        with self.lock:
            old = self.idle.pop(key, None)
            self.idle[key] = worker
            closing = [old] if old is not None else []
            while len(self.idle) > self.keep:
                closing.append(self.idle.popitem(last=False)[1])
        for w in closing:
            w.close()

    def take(self, key: str) -> Any:
        with self.lock:
            worker = self.idle.pop(key, None)
        if worker is not None and not worker.alive:
            worker.close()
            return None
        return worker

    def clear(self) -> None:
        with self.lock:
            workers, self.idle = list(self.idle.values()), OrderedDict()
        for w in workers:
            w.close()


_SESSIONS = _Sessions()


def _start_worker(label: str, args: dict[str, Any], bare: bool = True) -> Any:
    from ..toolchain import python_for
    from ..worker import Worker

    python = python_for(TOOLCHAIN, "rknn") if bare else None
    return Worker(FACTORY, args, label=label, python=python, bare=bare, auto_restart=False)


class RknnEngine(Engine):
    """A .rknn on the simulator (a toolchain session holding the built model) or on a board's NPU (RKNNLite)."""

    thread_safe = True  # one worker slot: calls are serialised by the worker

    def __init__(self, artifact: Artifact, device: str, core_mask: str, pass_through: bool = False) -> None:
        opts = artifact.options
        model_inputs = [TensorSpec.from_dict(d) for d in opts["inputs"]]
        model_outputs = [TensorSpec.from_dict(d) for d in opts["outputs"]]
        ins, outs = device_specs(artifact.options) if opts.get("int8_io") else (model_inputs, model_outputs)
        super().__init__(ins, outs)
        self.device = device
        self.built = {n: tuple(int(d) for d in s) for n, s in opts["shapes"].items()}
        self.key = _key(artifact)
        self._sim_in = {s.name: s for s in ins if s.is_quantised}
        self._sim_out = {s.name: s for s in outs if s.is_quantised}
        self._keep = device == "simulator"
        self._pass_through = device == "npu" and pass_through and bool(self._sim_in)
        self.joins = dict(opts.get("joins") or {})
        args = {
            "inputs": [s.name for s in model_inputs],
            "outputs": device_outputs([s.name for s in model_outputs], self.joins),
        }
        if device == "npu":
            if core_mask not in _CORE_MASKS:
                raise InputError(f"rknn core_mask must be one of {', '.join(_CORE_MASKS)}, not '{core_mask}'")
            self.worker = _start_worker("rknn npu", {"device": "npu"}, bare=False)
            self.worker.call(
                "load_npu",
                {**args, "core_mask": core_mask, "pass_through": self._pass_through},
                {"file:model.rknn": np.frombuffer(artifact.file("model.rknn"), np.uint8)},
            )
            return
        worker = _SESSIONS.take(self.key)
        if worker is None:  # rebuild in a new toolchain session from what the compile stored
            platform = opts.get("platform", DEFAULT_PLATFORM)
            worker = _start_worker("rknn simulator", {"platform": platform, "device": "simulator"})
            rebuild = _session_args(
                platform,
                artifact.precision,
                model_inputs,
                model_outputs,
                self.built,
                opts.get("algorithm", "normal"),
                self.joins,
            )
            if artifact.precision == "int8":
                arrays = {f"file:{n}": np.frombuffer(artifact.file(n), np.uint8) for n in INT8_FILES}
            else:
                arrays = {"model": np.frombuffer(artifact.file("model.onnx"), np.uint8)}
            try:
                worker.call("rebuild", rebuild, arrays)
            except BaseException:
                worker.close()
                raise
        self.worker = worker

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self._batch_of(feeds)
        if batch is None:
            return self._run_one(feeds)
        parts = [self._run_one({n: a[i : i + 1] for n, a in feeds.items()}) for i in range(batch)]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _batch_of(self, feeds: dict[str, np.ndarray]) -> int | None:
        """None when every input has the shape built; the batch when only the first axis differs (built as 1)."""
        if all(tuple(a.shape) == self.built[n] for n, a in feeds.items()):
            return None
        sizes = set()
        for n, a in feeds.items():
            built = self.built[n]
            if a.ndim != len(built) or tuple(a.shape[1:]) != built[1:] or built[0] != 1:
                raise ShapeError(
                    f"rknn built input '{n}' at shape {list(built)} (a .rknn has static shapes); got {list(a.shape)}. "
                    "Recompile with --input-shape for this shape"
                )
            sizes.add(a.shape[0])
        if len(sizes) != 1:
            raise ShapeError(f"rknn: the inputs' batch sizes differ: {sorted(sizes)}")
        return sizes.pop()

    def _run_one(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._sim_in and not self._pass_through:  # exact float: the runtime quantises it back to the same ints
            feeds = {n: self._sim_in[n].dequantise(a) if n in self._sim_in else a for n, a in feeds.items()}
        outs = join_outputs(self.worker.call("run", None, feeds)[1], self.joins)
        if self._sim_out:
            outs = {
                n: self._sim_out[n].quantise(np.asarray(a, np.float32)) if n in self._sim_out else a
                for n, a in outs.items()
            }
        return outs

    def layerwise(self, feeds: dict[str, np.ndarray]) -> str:
        """The toolkit's accuracy_analysis report on one sample (float feeds), from the session that built it."""
        return str(self.worker.call("layerwise", None, feeds)[0].get("report", ""))

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._keep and self.worker.alive:
            _SESSIONS.put(self.key, self.worker)
        else:
            self.worker.close()
