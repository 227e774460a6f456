"""ONNX Runtime: CPU, and the CUDA / TensorRT execution providers behind device="cuda".

Compile saves the graph after ORT's portable (basic) optimisations; it never picks a device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import onnx_io
from ..errors import BackendUnavailableError, CompileError, MissingExtraError, ModelError, UnsupportedOpError
from ._int8 import QDQ_U8S8
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, Option

_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_NO_OP = re.compile(r"(?:([\w.]+):)?(\w+)\((-?\d+)\) is not a registered function/op")


def _raise_engine_error(exc: Exception, backend: str) -> None:
    msg = str(exc)
    if onnx_io.EXTERNAL_REFUSED.search(msg):
        raise ModelError(
            f"{backend}: the model names external data that is not in its package ({msg.strip().splitlines()[-1]}); "
            "a package's weights come from the package only: the package is damaged or hostile"
        ) from exc
    m = _NO_KERNEL.search(msg)
    if m:
        op, version, node = m.groups()
        raise UnsupportedOpError(
            f"{backend} cannot run operator {op} (opset {version}) at node '{node}'; "
            "try another target or replace the operator before export"
        ) from exc
    m = _NO_OP.search(msg)
    if m:
        domain, op, version = m.groups()
        where = f"{domain}:{op}" if domain else op
        raise UnsupportedOpError(
            f"{backend} cannot run operator {where} (opset {version}): it is not registered in this onnxruntime"
        ) from exc
    raise CompileError(f"{backend} could not build the model: {msg.strip().splitlines()[-1][:500]}") from exc


_DATA = "model.onnx.data"
"""A model over 2 GB keeps its weights here, as ONNX external data (see luodi.onnx_io)."""


# onnxruntime's WeightBiasQuantization (ORT_ENABLE_BASIC and up) quantises the float weights of a Conv/Gemm fed by a
# DequantizeLinear to int8, per tensor: exactly the layers an int8 graph keeps in float on purpose (the fallback's
# sensitive layers; a depthwise conv's per-channel weights spanning 1e-4..1 lost their small channels). Lite0 with
# block 0's depthwise conv kept float agreed 65.7% with fp32 on onnxruntime against 92.3% for the graph as written.
# luodi writes every quantisation it wants into the graph; the session changes none.
_DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def _session(ort: Any, files: dict[str, bytes], make_options: Callable[[], Any], providers: list[Any]) -> Any:
    """An InferenceSession from an artifact's bytes; external weights are handed over from memory, never a file."""
    make_options = onnx_io.sealed_ort_options(make_options)
    kept = {"providers": providers, "disabled_optimizers": _DISABLED_OPTIMIZERS}
    if _DATA not in files:
        return ort.InferenceSession(files["model.onnx"], make_options(), **kept)
    data = files[_DATA]
    so = make_options()
    so.add_external_initializers_from_files_in_memory([_DATA], [data], [len(data)])
    try:
        return ort.InferenceSession(files["model.onnx"], so, **kept)
    except Exception as exc:
        if "limit for embedded initializer" not in str(exc):
            raise
    # One weight over 2 GB: ORT will not embed it from an in-memory file. Hand every external weight over as an
    # OrtValue viewing the artifact's bytes instead (no copy; the session keeps the views alive).
    so = make_options()
    names, values = _external_ortvalues(ort, files["model.onnx"], data)
    so.add_external_initializers(names, values)
    sess = ort.InferenceSession(files["model.onnx"], so, **kept)
    sess._luodi_weights = values
    return sess


def _external_ortvalues(ort: Any, graph: bytes, data: bytes) -> tuple[list[str], list[Any]]:
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise MissingExtraError(
            "loading a model with a single weight over 2 GB reads its graph with onnx: pip install 'luodi[compiler]'"
        ) from None
    model = onnx.load_model_from_string(graph)
    names, values = [], []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(info["length"]) // dtype.itemsize
        array = np.frombuffer(data, dtype=dtype, count=count, offset=int(info.get("offset", 0))).reshape(t.dims)
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return names, values


class _CudaStream:
    """A CUDA stream owned by one session, so two sessions on one GPU do not serialise."""

    def __init__(self, device_id: int) -> None:
        self._lib = self._cudart()
        self._lib.cudaSetDevice(device_id)
        handle = ctypes.c_void_p()
        rc = self._lib.cudaStreamCreateWithFlags(ctypes.byref(handle), 1)  # cudaStreamNonBlocking
        if rc != 0:
            raise BackendUnavailableError(f"cudaStreamCreateWithFlags failed with CUDA error {rc}")
        self.handle = handle

    @staticmethod
    def _cudart() -> ctypes.CDLL:
        candidates = [ctypes.util.find_library("cudart")]
        try:
            import nvidia.cuda_runtime  # type: ignore[import-not-found]

            lib_dir = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
            candidates += [str(p) for p in sorted(lib_dir.glob("libcudart.so*"))]
        except ImportError:
            pass
        for c in filter(None, candidates):
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
        raise BackendUnavailableError(
            "device='cuda' needs the CUDA runtime (libcudart); install it with: pip install 'luodi[cuda]'"
        )

    def close(self) -> None:
        if self.handle:
            self._lib.cudaStreamDestroy(self.handle)
            self.handle = ctypes.c_void_p()


class OnnxRuntimeEngine(Engine):
    def __init__(self, session: Any, stream: _CudaStream | None, profile_dir: Any = None) -> None:
        self._profile_dir = profile_dir
        inputs, outputs = _specs_of_session(session)
        super().__init__(inputs, outputs)
        self._sess = session
        self._out_names = [o.name for o in outputs]
        self._stream = stream
        self.providers = session.get_providers()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._out_names, self._sess.run(self._out_names, feeds)))

    def profile(self) -> list[dict[str, Any]] | None:
        """ONNX Runtime's profiler (load option ``profiling``): its JSON trace's node events, summed per node. Ends
        the profile (ORT writes the trace once); the trace file is removed once read."""
        if self._profile_dir is None or self._sess is None:
            return None
        trace = Path(self._sess.end_profiling())
        try:
            events = json.loads(trace.read_text())
        finally:
            trace.unlink(missing_ok=True)
        nodes: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                continue
            name = e["name"][: -len("_kernel_time")]
            rec = nodes.setdefault(name, {"node": name, "op": e.get("args", {}).get("op_name", ""), "ms": 0.0})
            rec["ms"] += e.get("dur", 0) / 1e3  # microseconds in the trace
            rec["calls"] = rec.get("calls", 0) + 1
        return list(nodes.values())

    def close(self) -> None:
        super().close()
        self._sess = None
        if self._profile_dir is not None:
            self._profile_dir.cleanup()
            self._profile_dir = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None


_ORT_DTYPES = {
    f"tensor({k})": v
    for k, v in {
        "float": "float32",
        "double": "float64",
        "float16": "float16",
        "bool": "bool",
        **{t: t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    }.items()
}


def _specs_of_session(session: Any) -> tuple[list, list]:
    from ..tensor import TensorSpec

    def conv(arg: Any) -> TensorSpec:
        t = arg.type  # e.g. "tensor(float)"
        dtype = _ORT_DTYPES.get(t)
        if dtype is None:
            raise ModelError(f"{arg.name} has type {t}, which luodi does not pass across a model boundary")
        shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
        return TensorSpec(arg.name, dtype, shape)

    return [conv(a) for a in session.get_inputs()], [conv(a) for a in session.get_outputs()]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    in_memory = True
    precisions = ("fp32", "int8")
    module = "onnxruntime"
    extra = None  # part of the default install
    # ORT fuses each QDQ node unit into an int8 kernel (QLinearConv, MatMulInteger...): see luodi.backends._int8.
    int8_policy: ClassVar[dict[str, Any] | None] = QDQ_U8S8
    load_options: ClassVar[Mapping[str, Option]] = {
        "tensorrt": Option(bool, "whether to put TensorRT's execution provider in front of CUDA's (device='cuda')"),
        "profiling": Option(bool, "whether ONNX Runtime's profiler records per-node times (Engine.profile())"),
    }

    def available(self) -> Availability:
        base = super().available()
        if not base.ok:
            return base
        import onnxruntime as ort

        providers = ort.get_available_providers()
        devices = ["cpu"]
        if "CUDAExecutionProvider" in providers:
            devices.append("cuda")
        if "TensorrtExecutionProvider" in providers:
            devices.append("tensorrt")
        return Availability(True, devices=tuple(devices), precisions=self.precisions, version=ort.__version__)

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        ort = self.require()
        if options.precision == "int8":
            return self._compile_qdq(ort, model)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.log_severity_level = 3
        large = onnx_io.is_large(model)
        with tempfile.TemporaryDirectory(prefix="luodi-ort-") as tmp:
            out = os.path.join(tmp, "optimized", "model.onnx")
            os.mkdir(os.path.dirname(out))
            so.optimized_model_filepath = out
            if large:  # over 2 GB: ORT reads the graph and its external data from files and writes them back alike
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name", _DATA)
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", str(onnx_io.MIN_EXTERNAL)
                )
                source: Any = str(onnx_io.save(model, os.path.join(tmp, "model.onnx"))[0])
            else:
                source = options.model_bytes or model.SerializeToString()
            try:
                ort.InferenceSession(
                    source, so, providers=["CPUExecutionProvider"], disabled_optimizers=_DISABLED_OPTIMIZERS
                )
            except Exception as exc:  # ORT raises its own exception types; translate them
                _raise_engine_error(exc, self.name)
            files = {"model.onnx": Path(out).read_bytes()}
            if large:
                files[_DATA] = Path(out).with_name(_DATA).read_bytes()
        return Artifact(self.name, options.precision, files, {"optimization": "basic"})

    def _compile_qdq(self, ort: Any, model: Any) -> Artifact:
        """int8: ``model`` is the QDQ graph luodi.quant wrote for this backend's policy. It is stored as written:
        even ORT's basic optimisations were measured to change its numerics (a Clip folded into the next
        QuantizeLinear), and the int8 fusions are hardware-specific, so they run at load (ORT_ENABLE_ALL)."""
        if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            raise CompileError(f"{self.name}:int8 needs a quantised (QDQ) graph; compile it with calibration data")
        files = onnx_io.to_members(model)

        def options() -> Any:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            return so

        try:
            _session(ort, files, options, ["CPUExecutionProvider"])
        except Exception as exc:
            _raise_engine_error(exc, self.name)
        return Artifact(self.name, "int8", files, {"optimization": "none (QDQ as written)"})

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        ort = self.require()

        def session_options() -> Any:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if options.threads:
                so.intra_op_num_threads = options.threads
            # The artifact already holds the portable optimisations; the rest are hardware-specific.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if profile_dir is not None:
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(profile_dir.name, "ort")
            return so

        profiling = options.extra.get("profiling")
        profile_dir = tempfile.TemporaryDirectory(prefix="luodi-ort-profile-") if profiling else None
        providers, stream = self._providers(options)
        if "model.onnx" not in artifact.files:
            raise ModelError(f"{artifact.target} artifact has no model.onnx")
        try:
            sess = _session(ort, artifact.files, session_options, providers)
        except Exception as exc:
            if stream is not None:
                stream.close()
            if profile_dir is not None:
                profile_dir.cleanup()
            _raise_engine_error(exc, self.name)
        return OnnxRuntimeEngine(sess, stream, profile_dir)

    def _providers(self, options: LoadOptions) -> tuple[list[Any], _CudaStream | None]:
        device = options.device
        if device == "cpu":
            return ["CPUExecutionProvider"], None
        kind, _, index = device.partition(":")
        if kind not in ("cuda", "tensorrt"):
            raise BackendUnavailableError(
                f"{self.name} has no device '{device}'; choose 'cpu', 'cuda[:N]' or 'tensorrt[:N]'"
            )
        avail = self.available()
        if kind not in avail.devices:
            raise BackendUnavailableError(
                f"device '{device}' needs onnxruntime with the {kind.upper()} execution provider "
                f"(this onnxruntime has devices {list(avail.devices)}); install it with: pip install 'luodi[cuda]'"
            )
        device_id = int(index or 0)
        stream = _CudaStream(device_id)
        cuda = {
            "device_id": device_id,
            "has_user_compute_stream": "1",
            "user_compute_stream": str(stream.handle.value),
        }
        providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        if kind == "tensorrt" or options.extra.get("tensorrt"):
            trt = {
                "device_id": device_id,
                "has_user_compute_stream": "1",
                "user_compute_stream": str(stream.handle.value),
            }
            providers.insert(0, ("TensorrtExecutionProvider", trt))
        return providers, stream
