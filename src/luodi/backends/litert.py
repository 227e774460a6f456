"""LiteRT (TensorFlow Lite): ``.tflite`` models run in-process with ai-edge-litert's Interpreter (XNNPACK on a CPU).

Route: the package's ``torch.export`` program (a model exported from PyTorch) is converted by ``litert-torch`` to a
float ``.tflite`` (``litert:fp32``), and ``ai-edge-quantizer``'s static int8 recipe (int8 weights per channel, int8
activations calibrated on the compile's calibration data) makes it full integer with int8 inputs and outputs
(``litert:int8``), bytes to bytes, in luodi's own environment. luodi adds two steps of its own PTQ to the recipe
(_litert_int8): each intermediate activation's range is the MSE-optimal one on its histogram over the samples (the
model's inputs and outputs keep their min and max), and each Conv/depthwise/FullyConnected bias absorbs the mean
output error of its rounded int8 weights (bias correction). On EfficientNet-Lite0's 169 held-apart photos they
took top-1 agreement with fp32 from 85.8% (the recipe on min/max ranges) to 92.9% (onnxruntime:int8: 91.1%); the
Fashion-MNIST CNN stays at fp32's accuracy (89.52% vs 89.56%). Measured against the other route (onnx2tf from the
ONNX graph, in a TensorFlow environment of its own) in docs/boards.md: a point less agreement on EfficientNet-Lite0,
four times faster, no network and no second environment. A model that came from ONNX has no torch program, so
litert says so at compile time (NotApplicableError).

Layout: litert-torch keeps the torch module's own layout at the model's boundary (NCHW in, the module's outputs
out; it transposes inside the graph), so the .tflite reads and writes luodi's canonical tensors unchanged. The
compile records what it converted (``layout``) and checks the .tflite's shapes against the built shapes.

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

from ..errors import BackendError, CompileError, ModelError, NotApplicableError, ShapeError
from ..tensor import TensorSpec
from ._int8 import VENDOR_W8A8
from .base import Artifact, Backend, CompileOptions, Engine, LoadOptions
from .contract import Option
from .shapes import primary_shapes

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
INSTALL = "pip install 'luodi[litert]'"


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
    precision_note = "fp32: litert-torch's float .tflite; int8: full integer (int8 I/O) by ai-edge-quantizer"
    estimates = ("int8",)
    load_options = {
        "num_threads": Option(int, "the interpreter's thread count (XNNPACK); Session(threads=...) sets it too"),
    }

    # -- compile --------------------------------------------------------------------------------------------------
    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        program = getattr(options.source, "torch_program", None)
        if program is None:
            raise NotApplicableError(
                "litert converts models exported from PyTorch (litert-torch converts the package's torch.export "
                "program); this model came from ONNX and has none. Compile it from its PyTorch module "
                "(luodi.export in Python, `luodi export BUILDER`), or choose another target, e.g. onnxruntime:int8"
            )
        inputs, outputs = options.io(model)
        if any(s.np_dtype.kind != "f" for s in inputs):
            bad = [f"{s.name} ({s.dtype})" for s in inputs if s.np_dtype.kind != "f"]
            raise CompileError(f"litert converts models with float inputs only; this model has {bad}")
        shapes = primary_shapes(inputs, options)
        module = _torch_module(
            program() if callable(program) else program, options.input_normalization, [s.name for s in inputs]
        )
        data = _convert(module, [shapes[s.name] for s in inputs])
        record: dict[str, Any] = {
            "shapes": {s.name: [int(d) for d in shapes[s.name]] for s in inputs},
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "layout": "the torch module's (unchanged at the boundary)",
            "converter": f"litert-torch {_version('litert-torch')}",
        }
        if options.precision == "int8":
            calibration = list(options.calibration or ())
            if not calibration:
                raise CompileError("litert:int8 needs calibration data: pass calibration= (CLI: --calibration)")
            samples = [
                {s.name: _fit(np.asarray(f[s.name], np.float32), shapes[s.name], s.name) for s in inputs}
                for f in calibration
            ]
            pixels = (options.input_normalization or {}).get("input")
            data, record["int8"] = _quantise(data, [s.name for s in inputs], samples, pixels)
            record["converter"] += f", ai-edge-quantizer {_version('ai-edge-quantizer')} static_wi8_ai8"
        interp = _interpreter(data, 1)
        ins, outs = _boundary(interp)
        if len(ins) != len(inputs) or len(outs) != len(outputs):
            raise CompileError(
                f"litert: the .tflite has {len(ins)} input(s) and {len(outs)} output(s); the model has "
                f"{len(inputs)} and {len(outputs)}"
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
                spec.name: {
                    "scale": float(d["quantization"][0]),
                    "zero_point": int(d["quantization"][1]),
                    "dtype": np.dtype(d["dtype"]).name,
                }
                for spec, d in [*zip(inputs, ins), *zip(outputs, outs)]
                if np.dtype(d["dtype"]).kind in "iu"
            }
            artifact.io = device_specs(artifact)
        return artifact

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


def device_specs(artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The target's inputs and outputs as the interpreter reads and writes them: integers with their scale and zero
    point where the .tflite quantised them, the model's own specs elsewhere."""
    params = artifact.options.get("device_io") or {}

    def specs(key: str) -> list[TensorSpec]:
        out = []
        for d in artifact.options[key]:
            s = TensorSpec.from_dict(d)
            p = params.get(s.name)
            out.append(TensorSpec(s.name, p["dtype"], s.shape, p["scale"], p["zero_point"]) if p else s)
        return out

    return specs("inputs"), specs("outputs")


class LitertEngine(Engine):
    """One ai-edge-litert Interpreter on the .tflite; calls are serialised (an Interpreter is not thread safe)."""

    thread_safe = False

    def __init__(self, artifact: Artifact, threads: int | None) -> None:
        ins, outs = device_specs(artifact)
        super().__init__(ins, outs)
        self.built = {n: tuple(int(d) for d in s) for n, s in artifact.options["shapes"].items()}
        try:
            self._interp = _interpreter(artifact.file(MODEL_FILE), threads)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the interpreter refuses a bad file in its own ways
            raise ModelError(f"litert cannot load {artifact.target}'s {MODEL_FILE}: {exc}") from exc
        tin, tout = _boundary(self._interp)
        self._in = [(s.name, d["index"]) for s, d in zip(ins, tin)]
        self._out = [(s.name, d["index"]) for s, d in zip(outs, tout)]

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
            return {n: np.concatenate([p[n] for p in parts]) for n, _ in self._out}
        got = {n: list(a.shape) for n, a in feeds.items()}
        raise ShapeError(f"litert runs the shapes it was built at {self._built_text()} (any batch), got {got}")

    def _invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        for name, index in self._in:
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        return {name: interp.get_tensor(index) for name, index in self._out}

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

    from ..errors import BackendUnavailableError

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
    data: bytes, names: list[str], samples: list[dict[str, np.ndarray]], pixels: str | None
) -> tuple[bytes, dict[str, Any]]:
    """Full int8 by ai-edge-quantizer's static_wi8_ai8 with luodi's ranges and bias correction (_litert_int8), and
    what was done. Each activation's range starts as the global min and max of ``samples``; an input that takes pixel
    values (``pixels``: the pipeline's normalisation was folded into the model) gets the range 0..255 whatever the
    samples reach, so that every pixel value is an int8 exactly (scale 1, zero point -128)."""
    _require("ai_edge_quantizer", "ai-edge-quantizer")
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    from . import _litert_int8

    interp = _interpreter(data, 1)
    keys = _numbered(interp.get_signature_list()[SIGNATURE]["inputs"])
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


def _boundary(interp: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The interpreter's input and output details in the signature's order (the model's)."""
    runner = interp.get_signature_runner(SIGNATURE)
    ins, outs = runner.get_input_details(), runner.get_output_details()
    return [ins[k] for k in _numbered(ins)], [outs[k] for k in _numbered(outs)]


def _fit(a: np.ndarray, shape: Any, name: str) -> np.ndarray:
    """A calibration sample at the built shape (a batch given at once is split into samples by the caller)."""
    shape = tuple(int(d) for d in shape)
    if a.shape == shape:
        return a
    if a.ndim == len(shape) and a.shape[1:] == shape[1:] and shape[0] == 1 and a.shape[0] >= 1:
        return a[:1]
    raise CompileError(
        f"litert: calibration sample for input '{name}' has shape {list(a.shape)}, built at {list(shape)}"
    )


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the converters' progress output on stdout/stderr (Python's streams; native prints stay)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
