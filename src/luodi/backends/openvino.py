"""OpenVINO: Intel's engine, CPU (x86/ARM) and, where the drivers are installed, Intel GPU and NPU.

Compile (host side, offline)
    The canonical ONNX graph is read with ``openvino.Core().read_model`` (the ONNX frontend, in
    process; ``openvino.convert_model``/``ovc`` are not used because they send telemetry) and saved
    as OpenVINO IR with ``openvino.save_model(..., compress_to_fp16=False)``: the artifact is
    ``model.xml`` + ``model.bin`` with fp32 weights, the same files for every precision. The
    precision is an engine setting, recorded in the artifact options and applied at load time as
    ``INFERENCE_PRECISION_HINT``. Dynamic dimensions (the batch axis) stay dynamic in the IR.
    Compile also builds the model once on CPU, so an operator that the ONNX frontend cannot read or
    the CPU plugin cannot build is an ``UnsupportedOpError`` naming the operator, its node(s) and
    the backend before anything is written.

Precision is explicit, never the engine's default
    OpenVINO's CPU plugin runs in bf16 by default on CPUs with bf16 support (measured on an AMD
    EPYC with AVX-512 BF16: about 3e-2 max abs error on the small test CNN instead of 1e-6), so every
    load sets ``INFERENCE_PRECISION_HINT``: ``fp32`` -> ``f32``, ``bf16`` -> ``bf16``,
    ``fp16`` -> ``f16``, and reads it back from the compiled model. A device that does not list the
    precision in ``OPTIMIZATION_CAPABILITIES``, or a compiled model whose hint came back different
    (a CPU without fp16 silently turns ``f16`` into ``bf16``), is a ``BackendUnavailableError``,
    so the compiler records the target as failed and ``backend="auto"`` skips it.
    An int8 target's float layers (the fallback's, and operators without int8 kernels) run at the hint of
    its ``float_precision`` compile option (fp32 by default; bf16/fp16; recorded in the artifact options):
    the FakeQuantize layers stay int8 either way (measured with the performance counters).

Load (device side)
    ``device``: ``"cpu"``, ``"gpu"`` / ``"gpu:N"`` (OpenVINO ``GPU`` / ``GPU.N``) or ``"npu"``;
    a device that is not present raises ``BackendUnavailableError`` naming the ones that are.
    ``PERFORMANCE_HINT`` is ``LATENCY`` unless ``options={"performance_hint": "THROUGHPUT"}``;
    ``threads`` sets ``INFERENCE_NUM_THREADS``; ``options={"openvino_config": {...}}`` passes more
    OpenVINO properties through unchanged. ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` is 0: the CPU plugin would
    otherwise quantise activations to int8 in front of MatMuls with compressed (int8 + scale) weights, whatever
    the precision hint (0.066 max error on an int8-weight MiniLM at "fp32").

Run
    One ``InferRequest`` per thread per engine (``threading.local``, created on a thread's first
    call), so threads sharing a Session run concurrently and two Sessions never share requests.
    ``infer(feeds, share_inputs=True)`` wraps the caller's arrays without a copy; outputs are
    returned with ``share_outputs=False`` (OpenVINO's default), i.e. as fresh numpy arrays that the
    next inference cannot overwrite (with ``share_outputs=True`` they would be views of the
    request's buffers, measured to be overwritten by the next call). A thread's request keeps a
    reference to the last input arrays it was given until that thread's next call.

Reshape (``Session.prepare(shapes)``)
    The IR is dynamic, so ``run()`` takes any batch without ``prepare``. ``reshape(shapes)``
    additionally compiles a static-shape copy of the model for exactly those shapes and uses it
    whenever a call's input shapes match, falling back to the dynamic model for any other shape.
    Cost, measured on EfficientNet-Lite0 (2-core AMD EPYC, fp32): one more compile (about 0.1 s) and
    a second set of compiled weights in memory; gain: batch-1 latency about 5.4 ms -> 4.9 ms (8-10%).
    ``options={"static_reshape": False}`` turns it off (``reshape`` then does nothing).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import onnx_io
from ..errors import (
    BackendError,
    BackendUnavailableError,
    CompileError,
    ModelError,
    ShapeError,
    UnsupportedOpError,
)
from ..tensor import TensorSpec
from . import _nncf
from ._int8 import QDQ_U8S8
from ._openvino_errors import last_line, raise_read_error
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, Option

# luodi precision -> OpenVINO INFERENCE_PRECISION_HINT, and the OPTIMIZATION_CAPABILITIES entry it needs.
# int8: the QDQ graph's FakeQuantize ops run in int8 (OpenVINO's low-precision transformations); the rest in f32.
_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}
_LUODI_DEVICE = {"CPU": "cpu", "GPU": "gpu", "NPU": "npu"}


class _Plan:
    """One compiled model and the InferRequest each thread uses with it."""

    __slots__ = ("compiled", "shapes", "local")

    def __init__(self, compiled: Any, shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()) -> None:
        self.compiled = compiled
        self.shapes = shapes
        self.local = threading.local()

    def request(self) -> Any:
        try:
            return self.local.request
        except AttributeError:
            req = self.local.request = self.compiled.create_infer_request()
            return req


class OpenVinoEngine(Engine):
    thread_safe = True

    def __init__(
        self,
        core: Any,
        model: Any,
        compiled: Any,
        device: str,
        config: dict[str, Any],
        input_names: list[str],
        output_names: list[str],
        static_reshape: bool,
    ) -> None:
        super().__init__(*_specs_of(compiled, input_names, output_names))
        self.compiled_model = compiled
        """The dynamic-shape ``openvino.CompiledModel`` (e.g. to read back its properties)."""
        self.device = device
        self.config = dict(config)
        self.inference_precision = _read_hint(compiled)
        """The INFERENCE_PRECISION_HINT the compiled model reports (``"f32"``, ``"bf16"`` ...)."""
        self._core = core
        self._model = model
        self._dynamic = _Plan(compiled)
        self._static: _Plan | None = None
        self._static_reshape = static_reshape and any(None in s.shape for s in self.inputs)
        index = {name: i for i, port in enumerate(compiled.outputs) for name in port.get_names()}
        self._out = [(name, index[name]) for name in output_names]
        self._profile: dict[str, dict[str, Any]] | None = {} if config.get("PERF_COUNT") else None
        self._profile_lock = threading.Lock()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            plan = self._static
            if plan is None or any(feeds[n].shape != s for n, s in plan.shapes):
                plan = self._dynamic
            request = plan.request()
            values = request.infer(feeds, share_inputs=True).to_tuple()
            if self._profile is not None:
                self._count(request.profiling_info)
        except (RuntimeError, TypeError, KeyError, ValueError) as exc:
            raise BackendError(f"openvino failed to run the model: {last_line(str(exc))}") from exc
        return {name: values[i] for name, i in self._out}

    def _count(self, info: Any) -> None:
        with self._profile_lock:
            for p in info:
                if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED"):
                    rec = self._profile.setdefault(p.node_name, {"node": p.node_name, "op": p.node_type, "ms": 0.0})
                    rec["ms"] += p.real_time.total_seconds() * 1e3
                    rec["calls"] = rec.get("calls", 0) + 1
                    rec["kernel"] = p.exec_type

    def profile(self) -> list[dict[str, Any]] | None:
        """OpenVINO's performance counters (load option ``profiling``: PERF_COUNT), summed per executed node over
        every run since load; ``kernel`` is the implementation the plugin chose (e.g. jit_avx512_f32)."""
        if self._profile is None:
            return None
        with self._profile_lock:
            return [dict(r) for r in self._profile.values()]

    def reshape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Compile a static-shape copy for ``shapes`` (see the module docstring for the cost)."""
        if not self._static_reshape or self._model is None:
            return
        key = tuple((n, tuple(int(d) for d in s)) for n, s in sorted(shapes.items()))
        if self._static is not None and self._static.shapes == key:
            return
        model = self._model.clone()
        try:
            model.reshape({n: list(s) for n, s in key})
            compiled = self._core.compile_model(model, self.device, self.config)
        except RuntimeError as exc:
            raise ShapeError(f"openvino cannot fix the input shapes to {dict(key)}: {last_line(str(exc))}") from exc
        self._static = _Plan(compiled, key)

    def close(self) -> None:
        super().close()
        self._static = None
        self._dynamic = None  # type: ignore[assignment]
        self.compiled_model = None
        self._model = None


def _float_precision(precision: str, extra: Mapping[str, Any]) -> str:
    """What the float layers of a target at ``precision`` run in: the precision itself, or for int8 the
    ``float_precision`` option (fp32 unless given; "auto" is the fallback's to resolve, before compile)."""
    asked = extra.get("float_precision")
    if precision != "int8":  # the option is the int8 targets'; the float targets' precision is their own
        return precision
    if asked is None:
        return "fp32"
    if asked not in ("fp32", "bf16", "fp16"):
        why = " ('auto' is resolved by the compile's int8 fallback)" if asked == "auto" else ""
        raise CompileError(f"openvino's float_precision is 'fp32', 'bf16', 'fp16' or 'auto', not '{asked}'{why}")
    return str(asked)


def _read_hint(compiled: Any) -> str | None:
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except (RuntimeError, AttributeError):  # a device without the property
        return None


def _specs_of(compiled: Any, input_names: list[str], output_names: list[str]) -> tuple[list, list]:
    def conv(port: Any, name: str) -> TensorSpec:
        ps = port.get_partial_shape()
        shape = tuple(d.get_length() if d.is_static else None for d in ps) if ps.rank.is_static else ()
        return TensorSpec(name, str(np.dtype(port.get_element_type().to_dtype())), shape)

    ins = {n: p for p in compiled.inputs for n in p.get_names()}
    outs = {n: p for p in compiled.outputs for n in p.get_names()}
    return [conv(ins[n], n) for n in input_names], [conv(outs[n], n) for n in output_names]


class OpenVinoBackend(Backend):
    name = "openvino"
    in_memory = True
    precisions = ("fp32", "bf16", "fp16", "int8")
    devices = ("cpu", "gpu", "npu")
    module = "openvino"
    extra = "openvino"
    # OpenVINO reads the QDQ ONNX into FakeQuantize and runs u8 x s8 on CPU (oneDNN): see luodi.backends._int8.
    int8_policy: ClassVar[dict[str, Any] | None] = QDQ_U8S8
    compile_options: ClassVar[Mapping[str, Option]] = {
        "quantizer": Option(
            str,
            "who quantises an int8 target: 'luodi' (the default: luodi's QDQ graph, calibrated by luodi.quant) or "
            "'nncf' (OpenVINO's NNCF quantises the float model on the calibration samples; luodi[nncf])",
        ),
        "nncf_preset": Option(str, "quantizer 'nncf': NNCF's preset, 'performance' (its default) or 'mixed'"),
        "nncf_bias_correction": Option(str, "quantizer 'nncf': 'full' (the default), 'fast' (NNCF's default) or 'off'"),
        "nncf_subset_size": Option(int, "quantizer 'nncf': how many calibration samples NNCF uses (default all)"),
        "nncf_smooth_quant": Option((int, float), "quantizer 'nncf': SmoothQuant's alpha for convolutions (off)"),
        "float_precision": Option(
            str,
            "an int8 target's float layers (those the fallback keeps out of int8, and operators without int8 "
            "kernels): 'fp32' (the default), 'bf16' or 'fp16' (INFERENCE_PRECISION_HINT; the int8 layers stay "
            "int8), or 'auto': the fallback tries each this CPU runs natively and keeps the fastest that meets the "
            "budget. A package whose int8 target says bf16 loads only on a CPU with BF16",
        ),
        "nncf_max_drop": Option(
            (int, float),
            "quantizer 'nncf': quantise with accuracy control, keeping layers in float until top-1 agreement with "
            "the float model on the calibration samples drops by at most this much (e.g. 0.01)",
        ),
    }
    load_options: ClassVar[Mapping[str, Option]] = {
        "performance_hint": Option(str, 'OpenVINO\'s PERFORMANCE_HINT, "LATENCY" (the default) or "THROUGHPUT"'),
        "openvino_config": Option(dict, "more OpenVINO properties, passed to compile_model unchanged"),
        "static_reshape": Option(bool, "whether prepare(shapes) compiles a static-shape copy (default True)"),
        "profiling": Option(bool, "whether OpenVINO's performance counters (PERF_COUNT) are read (Engine.profile())"),
    }

    def __init__(self) -> None:
        self._core_obj: Any = None
        self._avail: Availability | None = None
        self._lock = threading.Lock()

    def _core(self) -> Any:
        if self._core_obj is None:
            ov = self.require()
            with self._lock:
                if self._core_obj is None:
                    self._core_obj = ov.Core()
        return self._core_obj

    # -- availability ----------------------------------------------------------------------------
    def available(self) -> Availability:
        if self._avail is not None:
            return self._avail
        base = super().available()
        if not base.ok:
            return base
        import openvino as ov

        try:
            core = self._core_obj or ov.Core()
            self._core_obj = core
            present = list(core.available_devices)
        except RuntimeError as exc:
            return Availability(False, reason=f"openvino could not start: {last_line(str(exc))}", install="")
        names = tuple(dict.fromkeys(_LUODI_DEVICE.get(d.split(".")[0], d.lower()) for d in present))
        by_device = self.device_precisions()
        runnable = {p for ps in by_device.values() for p in ps}
        self._avail = Availability(
            True,
            devices=names,
            precisions=tuple(p for p in self.precisions if p in runnable),
            version=ov.__version__,
        )
        return self._avail

    def device_precisions(self) -> dict[str, tuple[str, ...]]:
        """Per OpenVINO device present, the luodi precisions it lists in OPTIMIZATION_CAPABILITIES."""
        core = self._core()
        out = {}
        for dev in core.available_devices:
            out[dev] = self._precisions_on(core, dev)
        return out

    def _precisions_on(self, core: Any, ov_device: str) -> tuple[str, ...]:
        try:
            caps = set(core.get_property(ov_device, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError:
            return ()
        return tuple(p for p in self.precisions if _CAPABILITY[p] in caps)

    def int8_float_precisions(self) -> tuple[str, ...]:
        """Besides fp32, the precisions this host's CPU runs an int8 graph's float layers in natively and right:
        bf16 (AVX512_BF16 or AMX), the candidates of ``float_precision='auto'``. Not fp16, though an AVX512_FP16 CPU
        lists it: an int8 graph at the fp16 hint agreed with the float model on 1-21% of EfficientNet-Lite0's photos
        (OpenVINO 2026.4.1, Sapphire Rapids; the float model alone at fp16: 99.4%), so only an explicit
        ``float_precision='fp16'`` tries it, and the gate judges what it gives."""
        runs = self._precisions_on(self._core(), "CPU")
        return tuple(p for p in ("bf16",) if p in runs)

    # -- compile ---------------------------------------------------------------------------------
    def quantises_itself(self, extra: Mapping[str, Any]) -> bool:
        return extra.get("quantizer") == "nncf"

    def check_compile_options(self, extra: Mapping[str, Any], precision: str) -> None:
        super().check_compile_options(extra, precision)
        quantizer = extra.get("quantizer", "luodi")
        if quantizer not in _nncf.QUANTIZERS:
            raise CompileError(f"openvino has no quantizer '{quantizer}'; choose one of {', '.join(_nncf.QUANTIZERS)}")
        settings = [k for k in extra if k in _nncf.OPTIONS]
        if settings and quantizer != "nncf":
            raise CompileError(f"openvino option(s) {', '.join(settings)} need the option quantizer=nncf")
        if quantizer == "nncf":
            _nncf.check_settings(extra)

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        ov = self.require()
        quantizer = options.extra.get("quantizer", "luodi")
        nncf_int8 = quantizer == "nncf" and options.precision == "int8"  # the other precisions do not quantise
        float_precision = _float_precision(options.precision, options.extra)
        if nncf_int8 and options.int8_io:
            raise CompileError("openvino's quantizer 'nncf' keeps float inputs and outputs; drop --int8-io")
        core = self._core()
        try:
            if onnx_io.is_large(model):  # over 2 GB: OpenVINO reads the graph and its external weights from files
                with tempfile.TemporaryDirectory(prefix="luodi-ov-") as tmp:
                    ov_model = core.read_model(str(onnx_io.save(model, Path(tmp) / "model.onnx")[0]))
            else:
                ov_model = core.read_model(options.model_bytes or model.SerializeToString())
        except Exception as exc:  # OpenVINO raises RuntimeError/its own types; translate them
            raise_read_error(exc, model, self.name)

        onnx_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        onnx_outputs = [o.name for o in model.graph.output]
        ov_names = {n for p in (*ov_model.inputs, *ov_model.outputs) for n in p.get_names()}
        lost = [n for n in (*onnx_inputs, *onnx_outputs) if n not in ov_names]
        if lost:
            raise CompileError(f"{self.name} lost the names of tensor(s) {lost} when reading the model")

        if nncf_int8:
            ov_model = _nncf.quantize(ov_model, options.calibration, options.extra)
        # Build it once on CPU so an operator the CPU plugin cannot run fails here, not at load.
        runs = self._precisions_on(core, "CPU")
        hint = _HINT[float_precision] if options.precision in runs and float_precision in runs else "f32"
        try:
            core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        except Exception as exc:
            self._raise_plugin_error(exc, core, ov_model, model)

        with tempfile.TemporaryDirectory(prefix="luodi-ov-") as tmp:
            xml = Path(tmp) / "model.xml"
            ov.save_model(ov_model, str(xml), compress_to_fp16=False)
            files = {"model.xml": xml.read_bytes(), "model.bin": xml.with_suffix(".bin").read_bytes()}
        opts = {
            "precision": options.precision,
            "inference_precision_hint": _HINT[float_precision],
            "performance_hint": "LATENCY",
            "inputs": onnx_inputs,
            "outputs": onnx_outputs,
        }
        if options.precision == "int8":
            opts["float_precision"] = float_precision
        if nncf_int8:
            opts["quantizer"] = {"name": "nncf", **_nncf.DEFAULTS, **_nncf.check_settings(options.extra)}
        return Artifact(self.name, options.precision, files, opts)

    def _raise_plugin_error(self, exc: Exception, core: Any, ov_model: Any, model: Any) -> None:
        msg = str(exc)
        try:
            supported = core.query_model(ov_model, "CPU")
        except Exception:  # the query itself may fail on the same operator
            supported = None
        if supported is not None:
            missing = [
                op
                for op in ov_model.get_ordered_ops()
                if op.get_friendly_name() not in supported
                and op.get_type_name() not in ("Parameter", "Result", "Constant")
            ]
            if missing:
                names = ", ".join(f"{op.get_type_name()} at node '{op.get_friendly_name()}'" for op in missing[:5])
                raise UnsupportedOpError(
                    f"{self.name} (CPU plugin) cannot run operator {names}; "
                    "try another target or replace the operator before export"
                ) from exc
        raise CompileError(f"{self.name} could not build the model on CPU: {last_line(msg)}") from exc

    # -- load ------------------------------------------------------------------------------------
    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        ov = self.require()
        core = self._core()
        try:
            xml, weights = artifact.files["model.xml"], artifact.files["model.bin"]
        except KeyError as exc:
            raise ModelError(f"{artifact.target} artifact has no {exc.args[0]}") from None
        if artifact.precision not in _HINT:
            raise CompileError(f"{artifact.target}: {self.name} has no precision '{artifact.precision}'")
        device = self._ov_device(core, options.device)
        precision = artifact.precision
        if precision not in self._precisions_on(core, device):
            raise BackendUnavailableError(
                f"{self.name} cannot run {precision} on {device} here: the device lists optimisation "
                f"capabilities {sorted(core.get_property(device, 'OPTIMIZATION_CAPABILITIES'))}, "
                f"without {_CAPABILITY[precision]}; use a precision it has "
                f"({', '.join(self._precisions_on(core, device)) or 'none'}) or another device"
            )
        float_precision = str(artifact.options.get("float_precision", precision)) if precision == "int8" else precision
        if float_precision not in _HINT:
            raise ModelError(f"{artifact.target}: its float layers' precision '{float_precision}' is not OpenVINO's")
        if float_precision not in ("fp32", "int8") and float_precision not in self._precisions_on(core, device):
            raise BackendUnavailableError(
                f"{self.name} cannot run {artifact.target} on {device} here: its float layers are "
                f"{float_precision} (the package's float_precision) and the device lists optimisation "
                f"capabilities {sorted(core.get_property(device, 'OPTIMIZATION_CAPABILITIES'))}, without "
                f"{_CAPABILITY.get(float_precision, float_precision)}; compile the int8 target with "
                "--option openvino.float_precision=fp32 for this device"
            )
        hint = _HINT[float_precision]
        extra = options.extra
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": str(extra.get("performance_hint", artifact.options.get("performance_hint", "LATENCY"))),
        }
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = int(options.threads)
        if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in self._supported(core, device):
            # The CPU plugin quantises activations to int8 on the fly (groups of 32) in front of MatMuls whose
            # weights are stored compressed (int8 + Cast + Mul), whatever the precision hint: 0.10 max error on a
            # 64x64 layer, 0.066 on an int8-weight MiniLM, instead of 2e-6. Off: the precision asked for is kept.
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        if extra.get("profiling"):
            config["PERF_COUNT"] = True
        config.update(extra.get("openvino_config", {}))
        try:
            model = core.read_model(xml.decode("utf-8"), ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            compiled = core.compile_model(model, device, config)
        except Exception as exc:  # OpenVINO's own exception types; translate them
            raise CompileError(
                f"{self.name} could not load {artifact.target} on {device}: {last_line(str(exc))}"
            ) from exc
        got = _read_hint(compiled)
        if got is not None and got != hint:
            raise BackendUnavailableError(
                f"{self.name} on {device} runs {artifact.target} in {got}, not the {hint} "
                f"it was asked for; use a precision the device supports natively"
            )
        names = {}
        for kind, ports in (("inputs", compiled.inputs), ("outputs", compiled.outputs)):
            names[kind] = list(artifact.options.get(kind) or [p.get_any_name() for p in ports])
            missing = [n for n in names[kind] if not any(n in p.get_names() for p in ports)]
            if missing:
                raise ModelError(f"{artifact.target} IR has no {kind[:-1]}(s) named {missing}")
        static = bool(extra.get("static_reshape", True))
        return OpenVinoEngine(core, model, compiled, device, config, names["inputs"], names["outputs"], static)

    def _supported(self, core: Any, device: str) -> set[str]:
        try:
            return {str(p) for p in core.get_property(device, "SUPPORTED_PROPERTIES")}
        except RuntimeError:
            return set()

    def _ov_device(self, core: Any, device: str) -> str:
        kind, _, index = device.lower().partition(":")
        present = list(core.available_devices)
        here = f"OpenVINO sees {present} (luodi names {list(self.available().devices)})"
        if kind not in ("cpu", "gpu", "npu") or (index and not index.isdigit()):
            raise BackendUnavailableError(
                f"{self.name} has no device '{device}'; choose 'cpu', 'gpu[:N]' or 'npu'; {here}"
            )
        if kind == "gpu" and index:
            name = f"GPU.{index}"
            ok = name in present or (index == "0" and "GPU" in present)
        else:
            name = kind.upper()
            ok = any(d.split(".")[0] == name for d in present)
        if not ok:
            raise BackendUnavailableError(f"device '{device}' is not present for {self.name}: {here}")
        return name
