"""LiteRT (TensorFlow Lite): ``.tflite`` models run in-process with ai-edge-litert's Interpreter (XNNPACK on a CPU).

Two routes to a float ``.tflite`` (``litert:fp32``), chosen by what the package holds:

- a model exported from PyTorch: its ``torch.export`` program is converted by ``litert-torch``, bytes to bytes, in
  luodi's own environment (measured against onnx2tf on EfficientNet-Lite0 in docs/boards.md: a point less
  agreement, four times faster, no second environment);
- a model that came from ONNX (no torch program): ``onnx2tf`` converts the graph in a toolchain environment of its
  own (TensorFlow 2.19, numpy 1.26: ``luodi toolchain install onnx2tf``), driven through a bare worker process
  (luodi.backends._onnx2tf_child); without that toolchain the compile is a BackendUnavailableError naming the
  command.

Either way ``ai-edge-quantizer``'s static int8 recipe (int8 weights per channel, int8 activations calibrated on the
compile's calibration data) then makes the float file full integer with int8 inputs and outputs (``litert:int8``),
in luodi's environment. luodi adds two steps of its own PTQ to the recipe (_litert_int8): each intermediate
activation's range is the MSE-optimal one on its histogram over the samples (the model's inputs and outputs keep
their min and max), and each Conv/depthwise/FullyConnected bias absorbs the mean output error of its rounded int8
weights (bias correction). On EfficientNet-Lite0's 169 held-apart photos they took top-1 agreement with fp32 from
85.8% (the recipe on min/max ranges) to 92.9% (onnxruntime:int8: 91.1%); the Fashion-MNIST CNN stays at fp32's
accuracy (89.52% vs 89.56%). On the ONNX route an output that is a Concat of unlike ranges (YOLOv8's pixel boxes
and 0..1 scores) is converted as its parts, each with its own int8 scale, and joined in float by the engine
(luodi.backends._outputs). The record says which route and converter made the file (``route``, ``converter``).

Layout: litert-torch keeps the torch module's own layout at the model's boundary (NCHW in, the module's outputs
out; it transposes inside the graph). onnx2tf keeps the inputs' NCHW (``keep_ncw_or_nchw_or_ncdhw_input_names``)
but writes 4-D outputs NHWC: the child finds each output's axis order against onnxruntime on the same input and the
engine transposes it back (``perms``). Either way the target reads and writes luodi's canonical tensors unchanged.
The compile records what it converted (``layout``) and checks the .tflite's shapes against the built shapes.

Shapes are static: the .tflite is built at the compile's primary shapes; a larger first axis runs one sample at a
time (``Backend.static_shapes``).

int8 I/O: the int8 .tflite reads and writes int8 with the scale and zero point its quantiser chose; they are the
target's ``io`` specs (``Artifact.io``), so a Session quantises float at the boundary, hands int8 to the
interpreter as it is, and dequantises the outputs unless ``raw_int8=True``.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import numpy as np

from ..errors import BackendError, BackendUnavailableError, CompileError, ModelError, ShapeError
from ..tensor import TensorSpec
from ._int8 import VENDOR_W8A8
from ._outputs import concat_outputs, device_outputs, join_outputs, split_outputs
from .base import Artifact, Backend, CompileOptions, Engine, LoadOptions
from .contract import Option
from .shapes import device_specs, fit_sample, primary_shapes

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
INSTALL = "pip install 'luodi[litert]'"
TOOLCHAIN = "onnx2tf"
FACTORY = "luodi.backends._onnx2tf_child:load"


def _numbered(names: Any) -> list[str]:
    """Signature names (``args_0``, ``output_1``...) in the order of their number (``args_10`` after ``args_9``)."""

    def number(name: str) -> tuple[int, str]:
        m = re.search(r"(\d+)$", name)
        return (int(m.group(1)) if m else 1 << 30, name)

    return sorted(names, key=number)


class LitertBackend(Backend):
    name = "litert"
    precisions = ("fp32", "int8")
    module = "ai_edge_litert"
    extra = "litert"
    calibrates_itself = True
    static_shapes = True
    in_memory = True
    # ai-edge-quantizer's static_wi8_ai8 recipe (TFLite's int8 scheme: symmetric per-channel int8 weights, asymmetric
    # per-tensor int8 activations), on biases luodi corrected (_litert_int8). The quantiser quantises the model itself;
    # this table only lets luodi's sensitivity ranking simulate it.
    int8_policy = {
        **VENDOR_W8A8,
        "bias_correction": True,
        "rounding": "half_away_from_zero",
        "notes": "ai-edge-quantizer static_wi8_ai8 on bias-corrected weights, approximated for the sensitivity ranking",
    }
    precision_note = (
        "fp32: a float .tflite (litert-torch from a PyTorch program, onnx2tf from ONNX); "
        "int8: full integer (int8 I/O) by ai-edge-quantizer"
    )
    estimates = ("int8",)
    load_options = {
        "num_threads": Option(int, "the interpreter's thread count (XNNPACK); Session(threads=...) sets it too"),
    }

    # -- compile --------------------------------------------------------------------------------------------------
    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        program = getattr(options.source, "torch_program", None)
        inputs, outputs = options.io(model)
        if any(s.np_dtype.kind != "f" for s in inputs):
            bad = [f"{s.name} ({s.dtype})" for s in inputs if s.np_dtype.kind != "f"]
            raise CompileError(f"litert converts models with float inputs only; this model has {bad}")
        shapes = primary_shapes(inputs, options)
        record: dict[str, Any] = {
            "shapes": {s.name: [int(d) for d in shapes[s.name]] for s in inputs},
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
        }
        keys: tuple[list[str], list[str]] | None = None
        if program is not None:
            module = _torch_module(
                program() if callable(program) else program, options.input_normalization, [s.name for s in inputs]
            )
            data = _convert(module, [shapes[s.name] for s in inputs])
            record["route"] = "litert-torch"
            record["layout"] = "the torch module's (unchanged at the boundary)"
            record["converter"] = f"litert-torch {_version('litert-torch')}"
        else:
            data, keys = self._from_onnx(model, options, inputs, outputs, shapes, record)
        if options.precision == "int8":
            calibration = list(options.calibration or ())
            if not calibration:
                raise CompileError("litert:int8 needs calibration data: pass calibration= (CLI: --calibration)")
            samples = [
                {
                    s.name: fit_sample(np.asarray(f[s.name], np.float32), shapes[s.name], s.name, "litert")
                    for s in inputs
                }
                for f in calibration
            ]
            pixels = (options.input_normalization or {}).get("input")
            data, record["int8"] = _quantise(data, [s.name for s in inputs], samples, pixels, keys[0] if keys else None)
            record["converter"] += f", ai-edge-quantizer {_version('ai-edge-quantizer')} static_wi8_ai8"
        interp = _interpreter(data, 1)
        ins, outs = _boundary(interp, keys)
        names = _device_outputs(record)
        if len(ins) != len(inputs) or len(outs) != len(names):
            raise CompileError(
                f"litert: the .tflite has {len(ins)} input(s) and {len(outs)} output(s); the model has "
                f"{len(inputs)} and {len(names)}"
            )
        for spec, detail in zip(inputs, ins):
            if list(detail["shape"]) != record["shapes"][spec.name]:
                raise CompileError(
                    f"litert: the .tflite's input {spec.name} has shape {list(detail['shape'])}, built at "
                    f"{record['shapes'][spec.name]} (the converter changed its layout)"
                )
        artifact = Artifact(self.name, options.precision, {MODEL_FILE: data}, record)
        if options.precision == "int8":
            record["device_io"] = {
                name: {
                    "scale": float(d["quantization"][0]),
                    "zero_point": int(d["quantization"][1]),
                    "dtype": np.dtype(d["dtype"]).name,
                }
                for name, d in [*zip([s.name for s in inputs], ins), *zip(names, outs)]
                if np.dtype(d["dtype"]).kind in "iu"
            }
            artifact.io = device_specs(artifact.options)
        return artifact

    def _from_onnx(
        self,
        model: Any,
        options: CompileOptions,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        shapes: Any,
        record: dict[str, Any],
    ) -> tuple[bytes, tuple[list[str], list[str]]]:
        """The ONNX route: onnx2tf in its own environment (luodi.toolchain) makes a float .tflite of the graph.

        int8: an output that is a Concat of unlike ranges (a detector's pixel boxes and 0..1 scores) is converted
        as its parts, each quantised with its own scale, and joined in float by the engine (luodi.backends._outputs).
        """
        from ..toolchain import python_for
        from ..worker import Worker

        try:
            python = python_for(TOOLCHAIN, "litert")
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(
                f"this model came from ONNX, which litert converts with onnx2tf: {exc} (a model exported from "
                "PyTorch converts without it, through litert-torch in luodi's own environment)"
            ) from None
        joins = concat_outputs(model) if options.precision == "int8" else {}
        if joins:
            graph = split_outputs(model, joins).SerializeToString()
        else:
            graph = options.model_bytes if options.model_bytes is not None else model.SerializeToString()
        names = device_outputs([s.name for s in outputs], joins)
        args = {"inputs": [s.name for s in inputs], "outputs": names, "shapes": record["shapes"]}
        worker = Worker(FACTORY, {}, label="litert onnx2tf", python=python, bare=True, auto_restart=False)
        try:
            header, out = worker.call("convert", args, {"model": np.frombuffer(graph, np.uint8)})
        except BackendError as exc:
            raise CompileError(str(exc)) from exc  # "litert onnx2tf: ..." with the tail of its log
        finally:
            worker.close()
        record["route"] = "onnx2tf"
        record["converter"] = f"onnx2tf {header.get('onnx2tf', '?')} (TensorFlow {header.get('tensorflow', '?')})"
        record["convert_seconds"] = header.get("seconds")
        record["signature"] = {"inputs": list(header["input_keys"]), "outputs": list(header["output_keys"])}
        record["perms"] = {n: p for n, p in (header.get("perms") or {}).items() if p is not None}
        record["layout"] = "inputs in the graph's layout (onnx2tf keeps NCHW)" + (
            f"; outputs {sorted(record['perms'])} transposed back from the converter's NHWC by the engine"
            if record["perms"]
            else ""
        )
        if joins:
            record["joins"] = joins
            record["device_outputs"] = names
        return bytes(out["tflite"].tobytes()), (record["signature"]["inputs"], record["signature"]["outputs"])

    def check_estimate(self, config: str) -> None:
        from . import _vela

        _vela.check(config)

    def estimate(self, artifact: Artifact, config: str) -> dict[str, Any]:
        """Arm Vela's estimate of the int8 .tflite on Ethos-U configuration ``config`` (luodi.backends._vela)."""
        from . import _vela

        return _vela.estimate(artifact.file(MODEL_FILE), config)

    # -- load -----------------------------------------------------------------------------------------------------
    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        self.require()
        threads = options.extra.get("num_threads", options.threads)
        if threads is not None and threads < 1:
            raise BackendError(f"litert num_threads must be at least 1, not {threads}")
        return LitertEngine(artifact, threads)


class LitertEngine(Engine):
    """One ai-edge-litert Interpreter on the .tflite; calls are serialised (an Interpreter is not thread safe)."""

    thread_safe = False

    def __init__(self, artifact: Artifact, threads: int | None) -> None:
        ins, outs = device_specs(artifact.options)
        super().__init__(ins, outs)
        self.built = {n: tuple(int(d) for d in s) for n, s in artifact.options["shapes"].items()}
        try:
            self._interp = _interpreter(artifact.file(MODEL_FILE), threads)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the interpreter refuses a bad file in its own ways
            raise ModelError(f"litert cannot load {artifact.target}'s {MODEL_FILE}: {exc}") from exc
        opts = artifact.options
        sig = opts.get("signature")
        tin, tout = _boundary(self._interp, (sig["inputs"], sig["outputs"]) if sig else None)
        self._in = [(s.name, d["index"]) for s, d in zip(ins, tin)]
        self._out = [(n, d["index"]) for n, d in zip(_device_outputs(opts), tout)]
        self.perms = {n: tuple(p) for n, p in (opts.get("perms") or {}).items()}
        self.joins = dict(opts.get("joins") or {})
        # a joined output's parts, each dequantised with its own scale before they are joined in float
        params = opts.get("device_io") or {}
        self._parts = {
            p: TensorSpec(p, params[p]["dtype"], (), params[p]["scale"], params[p]["zero_point"])
            for j in self.joins.values()
            for p in j["parts"]
            if p in params
        }

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = {n: a.shape[0] if a.ndim else 1 for n, a in feeds.items()}
        rows = next(iter(first.values()))
        built = next(iter(self.built.values()))[0] if self.built else rows
        if all(tuple(a.shape) == self.built.get(n) for n, a in feeds.items()):
            return self._invoke(feeds)
        if built == 1 and all(n in self.built and a.shape[1:] == self.built[n][1:] for n, a in feeds.items()):
            if len(set(first.values())) != 1:
                raise ShapeError(f"litert: inputs of different batch sizes {first}")
            parts = [self._invoke({n: a[i : i + 1] for n, a in feeds.items()}) for i in range(rows)]
            return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
        got = {n: list(a.shape) for n, a in feeds.items()}
        raise ShapeError(f"litert runs the shapes it was built at {self._built_text()} (any batch), got {got}")

    def _invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        for name, index in self._in:
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        outs = {}
        for name, index in self._out:
            a = interp.get_tensor(index)
            if name in self.perms:  # onnx2tf's NHWC back to the graph's layout
                a = np.ascontiguousarray(np.transpose(a, self.perms[name]))
            if name in self._parts:
                a = self._parts[name].dequantise(a)
            outs[name] = a
        return join_outputs(outs, self.joins)

    def _built_text(self) -> str:
        return ", ".join(f"{n} {list(s)}" for n, s in self.built.items())

    def close(self) -> None:
        super().close()
        self._interp = None


# -- conversion helpers ----------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _require(module: str, dist: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"litert needs {dist} ({exc.msg}): {INSTALL}") from None


def _torch_module(data: bytes, normalization: Any, names: list[str]) -> Any:
    """The exported program's module, normalising its pixel input as the graph does when the pipeline's
    normalisation was folded into the graph's first Conv (the program has not got it folded)."""
    torch = _require("torch", "torch")
    from .torch import _load_program

    module = _load_program(torch, data).module()
    if not normalization:
        return module

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.index = names.index(normalization["input"]) if normalization["input"] in names else 0
            self.register_buffer("mean", torch.tensor(normalization["mean"], dtype=torch.float32).reshape(1, -1, 1, 1))
            self.register_buffer(
                "inv_std", 1.0 / torch.tensor(normalization["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
            )

        def train(self, mode: bool = True) -> Any:  # an exported program's module refuses train()/eval()
            return self

        def forward(self, *args: Any) -> Any:
            args = list(args)
            args[self.index] = (args[self.index] - self.mean) * self.inv_std
            return self.inner(*args)

    return Normalised()


def _convert(module: Any, shapes: list[tuple[int, ...]]) -> bytes:
    torch = _require("torch", "torch")
    litert_torch = _require("litert_torch", "litert-torch")
    # A fixed generator: the sample inputs only trace; the converter's own progress goes to a discarded stream.
    gen = torch.Generator().manual_seed(0)
    args = tuple(torch.rand(tuple(int(d) for d in s), generator=gen) for s in shapes)
    try:
        with _quiet():
            data = litert_torch.convert(module, args).model_content()
    except Exception as exc:  # noqa: BLE001 - the converter fails in many ways
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:400]
        raise CompileError(f"litert-torch could not convert the model: {detail}") from exc
    return bytes(data)


def _quantise(
    data: bytes,
    names: list[str],
    samples: list[dict[str, np.ndarray]],
    pixels: str | None,
    keys: list[str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Full int8 by ai-edge-quantizer's static_wi8_ai8 with luodi's ranges and bias correction (_litert_int8), and
    what was done. Each activation's range starts as the global min and max of ``samples``; an input that takes pixel
    values (``pixels``: the pipeline's normalisation was folded into the model) gets the range 0..255 whatever the
    samples reach, so that every pixel value is an int8 exactly (scale 1, zero point -128). ``keys``: the signature's
    input keys in the order of ``names`` (onnx2tf's file; default: by their number)."""
    _require("ai_edge_quantizer", "ai-edge-quantizer")
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    from . import _litert_int8

    interp = _interpreter(data, 1)
    keys = keys or _numbered(interp.get_signature_list()[SIGNATURE]["inputs"])
    by_key = dict(zip(keys, names))
    runner = interp.get_signature_runner(SIGNATURE)
    details = runner.get_input_details()
    tensors = {k: details[k]["name"] for k in keys}
    boundary = {*tensors.values(), *(d["name"] for d in runner.get_output_details().values())}
    try:
        with _quiet():
            qt = quantizer.Quantizer(data)
            qt.load_quantization_recipe(recipe.static_wi8_ai8())
            # The quantiser's own calibrate() keeps a moving average of each tensor's min and max over the samples,
            # which leaves the ranges narrower than the data: later inputs saturate (Fashion-MNIST's logits reached
            # twice the averaged range; 87.5% vs 88.3% fp32 accuracy). The global min and max bound the histograms
            # from which _litert_int8 chooses the ranges, and stay the ranges of the model's inputs and outputs.
            calibration = calibrator.Calibrator(data, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
            calibration.calibrate({SIGNATURE: [{k: s[by_key[k]] for k in keys} for s in samples]}, qt._recipe_manager)
            calib = calibration.get_model_qsvs()
            for key, name in by_key.items():
                ranges = calib.get(tensors[key])
                if name == pixels and ranges is not None and ranges["min"].min() >= 0 and ranges["max"].max() <= 255:
                    ranges["min"], ranges["max"] = np.zeros_like(ranges["min"]), np.full_like(ranges["max"], 255.0)
            feeds = [{details[k]["index"]: s[by_key[k]] for k in keys} for s in samples]
            observed = _litert_int8.observe(data, feeds, calib, boundary)
            narrowed = _litert_int8.narrow(calib, observed)
            first = bytes(qt.quantize(calib).quantized_model)
            corrected, fixed = _litert_int8.correct_biases(data, first, observed.means)
            result = first
            if fixed:
                again = quantizer.Quantizer(corrected)
                again.load_quantization_recipe(recipe.static_wi8_ai8())
                result = bytes(again.quantize(calib).quantized_model)
    except Exception as exc:  # noqa: BLE001
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:400]
        raise CompileError(f"ai-edge-quantizer could not quantise the model: {detail}") from exc
    ranges = f"mse on {narrowed} tensor(s), min/max at the inputs and outputs"
    return result, {"activation_ranges": ranges, "bias_corrected_layers": fixed}


def _interpreter(data: bytes, threads: int | None) -> Any:
    _require("ai_edge_litert", "ai-edge-litert")
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=bytes(data), num_threads=threads or 1)
    interp.allocate_tensors()
    return interp


def _boundary(
    interp: Any, keys: tuple[list[str], list[str]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The interpreter's input and output details in the model's order: the signature keys recorded for each of
    them (onnx2tf's, which keeps the graph's names), else the signature's numbered order (litert-torch's)."""
    runner = interp.get_signature_runner(SIGNATURE)
    ins, outs = runner.get_input_details(), runner.get_output_details()
    kin, kout = keys if keys else (_numbered(ins), _numbered(outs))
    return [ins[k] for k in kin], [outs[k] for k in kout]


def _device_outputs(record: dict[str, Any]) -> list[str]:
    """The outputs the .tflite writes, in order: the model's, or a joined output's parts in its place."""
    return list(record.get("device_outputs") or [d["name"] for d in record["outputs"]])


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the converters' progress output on stdout/stderr (Python's streams; native prints stay)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
