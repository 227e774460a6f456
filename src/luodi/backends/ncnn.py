"""ncnn (Tencent): a small, dependency-free CPU engine; the ONNX -> ncnn conversion is pnnx's (luodi.backends._pnnx).

Compile converts with pnnx at the compiler's representative shapes (see luodi.backends._pnnx), giving
``model.param`` / ``model.bin``; ncnn names the blobs ``in0, in1, ...`` and ``out0, out1, ...`` in the ONNX
graph's input/output order, and the artifact options record that mapping. Compile then loads the param with
``ncnn.Net`` and extracts every output once on zeros (in a child process), so an operator that pnnx or ncnn
cannot handle is an error naming the op, its node(s) and "ncnn" at compile time, not at the first forward.
A package's .param is checked as text before ncnn reads it (luodi.backends._ncnn_param).

**Precision is explicit.** ncnn's default options silently compute in reduced precision
(fp16/bf16 storage and packing: 3e-3 max error on EfficientNet-Lite0 logits instead of 6e-6).
The fp32 target switches every ``use_fp16_* / use_bf16_* / use_int8_*`` option off before
``load_param``; the fp16 target (weights stored as fp16 by pnnx) switches fp16 packing, storage and
arithmetic on and bf16 off. The flags are recorded in the artifact options and applied at load.
Threads: ``Session(threads=N)`` sets ``opt.num_threads``; default ``os.cpu_count()``.

**Batch.** ncnn's unit of work is one item: a ``Mat`` has at most 4 dims and no batch axis. pnnx
says, per blob, which axis it treated as the batch and dropped (``batch_index`` in the ncnn script
it writes; 233 = none, the whole array is the Mat); compile records it in the artifact options.
An input whose batch is symbolic is run item by item: ``run`` feeds ``x[i:i+1]`` (the traced batch
of 1) to one ``Extractor`` per item and concatenates the outputs along each output's own batch axis
(pnnx's ``batch_index``: axis 1 for an OCR ``[W, N, C]``). Cost: a batch of N
takes about N times one item (ncnn parallelises inside each layer with ``num_threads``, not across
items; measured 42 ms for 4 vs 10.6 ms for 1 on EfficientNet-Lite0, 1 thread) plus one concatenate
copy of the outputs; batch 1 has no loop and no copy beyond ``np.array(mat)``. Inputs with fixed
shapes are fed whole in one extraction. ``Engine.reshape`` is a no-op: ncnn allocates per
extraction.

**Threads and memory.** One ``ncnn.Net`` is shared; each ``run`` creates its own ``Extractor``
(ncnn's per-thread state) and the extraction releases the GIL, so threads sharing a session run
concurrently with identical results. An input is handed to ncnn as a ``Mat`` view of the
caller's array (no copy), except when a layer reading it works in place (e.g. a leading ReLU):
ncnn then dereferences the Mat's refcount, which a numpy-backed Mat lacks (a segfault), and would
overwrite the caller's data, so that input is cloned into ncnn memory (about 20 us per 600 KB).
Outputs are copied out with ``np.array(mat)``, so they never alias memory freed with the extractor.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import BackendError, BackendUnavailableError, CompileError, ModelError, NotApplicableError, ShapeError
from ..tensor import TensorSpec
from . import _ncnn_int8, _pnnx
from ._int8 import VENDOR_W8A8
from ._ncnn_param import NO_BATCH as _NO_BATCH
from ._ncnn_param import parse_param, validate_param
from ._pnnx import BIN as _BIN
from ._pnnx import PARAM as _PARAM
from ._pnnx import executable as _pnnx_executable
from ._unfold import unfold_input_normalization
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, Option, memory_file

_FP16_ON = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic")
_INT8_ON = ("use_int8_inference", "use_int8_packed", "use_int8_storage")  # int8 layers; everything else fp32
_LOW_PRECISION = re.compile(r"^use_(fp16|bf16|int8)_")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """ncnn's C-level stderr (where it says why a .param does not load) into a list, for one compile-time load."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            out.append(buf.read().decode("utf-8", "replace"))


def _load_reason(log: str, layers: list[tuple[str, str, list[str], list[str]]]) -> str:
    """ncnn's last complaint, with the layer it names ("... layer 23") given its type and name."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    said = lines[-1] if lines else "ncnn gave no reason"
    m = re.search(r"layer (\d+)", said)
    if m and int(m[1]) < len(layers):
        ltype, lname, bottoms, tops = layers[int(m[1])]
        said += f" ({ltype} '{lname}', {len(bottoms)} input(s), {len(tops)} output(s))"
    return said[:400]


# -- ncnn options ---------------------------------------------------------------------------------
def _precision_flags(opt: Any, precision: str) -> dict[str, bool]:
    names = sorted(a for a in dir(opt) if _LOW_PRECISION.match(a))
    on = {"fp16": _FP16_ON, "int8": _INT8_ON}.get(precision, ())
    return {a: a in on for a in names}


def _new_net(ncnn: Any, flags: dict[str, bool], threads: int | None) -> Any:
    net = ncnn.Net()
    opt = net.opt
    for name, value in flags.items():
        if hasattr(opt, name):
            setattr(opt, name, bool(value))
    opt.use_vulkan_compute = False
    opt.num_threads = int(threads or os.cpu_count() or 1)
    return net


def _load_net(
    ncnn: Any, param: bytes, weights: bytes, flags: dict[str, bool], threads: int | None, in_memory: bool = False
) -> Any:
    net = _new_net(ncnn, flags, threads)
    if in_memory:
        # Decrypted files must not touch disk; load_model_mem would keep pointers into memory the binding
        # frees, so ncnn reads (and copies) them from anonymous memory files instead.
        with memory_file(param, _PARAM) as p, memory_file(weights, _BIN) as b:
            _read_net(net, p, b)
        return net
    # From files: ncnn's load_model_mem keeps pointers into memory the binding does not own.
    with tempfile.TemporaryDirectory(prefix="luodi-ncnn-") as tmp:
        p, b = os.path.join(tmp, _PARAM), os.path.join(tmp, _BIN)
        Path(p).write_bytes(param)
        Path(b).write_bytes(weights)
        _read_net(net, p, b)
    return net


def _read_net(net: Any, param_path: str, weights_path: str) -> None:
    if net.load_param(param_path) != 0:
        raise ModelError("ncnn could not read the target's model.param (ncnn printed why); recompile the package")
    if net.load_model(weights_path) != 0:
        raise ModelError("ncnn could not read the target's model.bin weights; recompile the package")


# -- engine ---------------------------------------------------------------------------------------
def _run_shape(spec: TensorSpec) -> tuple[int, ...] | None:
    """The shape one extraction produces: batch 1 where the batch is symbolic; None if not all known."""
    if not spec.shape:
        return ()
    dims = (1 if not isinstance(spec.shape[0], int) else spec.shape[0], *spec.shape[1:])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _axis(batch_index: int) -> int:
    return 0 if batch_index == _NO_BATCH else batch_index


class NcnnEngine(Engine):
    """One shared ``ncnn.Net``; each run creates its own Extractor per batch item."""

    thread_safe = True

    def __init__(self, ncnn: Any, net: Any, options: dict[str, Any]) -> None:
        inputs = [TensorSpec(d["name"], d.get("dtype", "float32"), tuple(d["shape"])) for d in options["inputs"]]
        outputs = [TensorSpec(d["name"], d.get("dtype", "float32"), tuple(d["shape"])) for d in options["outputs"]]
        super().__init__(inputs, outputs)
        self._Mat = ncnn.Mat
        self._net = net
        # Inputs are fed as views of the caller's array, except where a layer that reads the input
        # works in place: ncnn dereferences the Mat's refcount there, which a numpy-backed Mat lacks
        # (a crash), and would write into the caller's array; those inputs are cloned.
        blob_names = [blob.name for blob in net.blobs()]
        in_place = {
            blob_names[i] for la in net.layers() if la.type != "Input" and la.support_inplace for i in la.bottoms
        }
        # (name, blob, pnnx batch index, sliced per item?, copy?): a symbolic batch is run item by item
        self._ins = [
            (
                s.name,
                d["blob"],
                int(d.get("batch_index", 0)),
                bool(s.shape) and not isinstance(s.shape[0], int),
                d["blob"] in in_place,
            )
            for s, d in zip(inputs, options["inputs"])
        ]
        self._looped = any(sliced for _, _, _, sliced, _ in self._ins)
        self._single = self._ins[0] if len(self._ins) == 1 and self._looped else None
        # (name, blob, pnnx batch index, shape of one extraction when known, rank, dtype to cast to or None)
        self._outs = [
            (
                s.name,
                d["blob"],
                int(d.get("batch_index", 0)),
                _run_shape(s),
                len(s.shape),
                None if s.dtype == "float32" else s.np_dtype,
            )
            for s, d in zip(outputs, options["outputs"])
        ]
        # The axis a batch's items are stacked on: where the output names the inputs' batch dimension (CRNN
        # logits [T, batch, C]), else pnnx's batch axis for the blob, else 0.
        batch_dims = {s.shape[0] for s in inputs if s.shape and not isinstance(s.shape[0], int)}
        self._stack_axis = {
            name: next((i for i, d in enumerate(spec.shape) if not isinstance(d, int) and d in batch_dims), _axis(bi))
            for spec, (name, _, bi, *_) in zip(outputs, self._outs)
        }
        self.num_threads = net.opt.num_threads

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        single = self._single
        if single is not None:  # the common case: one input with a symbolic batch
            name, blob, bi, _, copy = single
            x = feeds[name]
            n = x.shape[0]
            if n == 1:
                return self._extract([(blob, x, bi, copy)])
            items = [self._extract([(blob, x[i : i + 1], bi, copy)]) for i in range(n)]
        elif not self._looped:  # fixed shapes: one extraction on the whole arrays
            return self._extract([(blob, feeds[name], bi, copy) for name, blob, bi, _, copy in self._ins])
        else:
            sizes = {name: int(feeds[name].shape[0]) for name, _, _, sliced, _ in self._ins if sliced}
            n = next(iter(sizes.values()))
            if any(v != n for v in sizes.values()):
                raise ShapeError(f"ncnn runs a batch item by item: the batched inputs need one batch size, got {sizes}")
            ins = self._ins
            items = [
                self._extract([(b, feeds[nm][i : i + 1] if sl else feeds[nm], bi, cp) for nm, b, bi, sl, cp in ins])
                for i in range(n)
            ]
        # each item's output carries the batch on its own batch axis (axis 1 for e.g. an OCR [W, N, C])
        return {
            name: np.concatenate([it[name] for it in items], axis=self._stack_axis[name]) for name in self._stack_axis
        }

    def _extract(self, feeds: list[tuple[str, np.ndarray, int, bool]]) -> dict[str, np.ndarray]:
        Mat = self._Mat
        ex = self._net.create_extractor()
        for blob, x, bi, copy in feeds:
            # Drop pnnx's (size 1) batch axis with a view; ncnn.Mat(x, batch_index=0) would copy.
            if bi == 0:
                x = x[0]
            elif bi != _NO_BATCH:
                x = np.take(x, 0, axis=bi)
            mat = Mat(np.ascontiguousarray(x))  # a view: ``x`` outlives the extraction
            ex.input(blob, mat.clone() if copy else mat)
        out = {}
        for name, blob, bi, shape, rank, cast in self._outs:
            rc, mat = ex.extract(blob)
            if rc != 0:
                raise BackendError(f"ncnn failed to compute output '{name}' (blob {blob}, error {rc})")
            y = np.array(mat)  # a copy: the extractor frees the Mat's memory
            if bi == 0:
                y = y[None]
            elif bi != _NO_BATCH:
                y = np.expand_dims(y, bi)
            if shape is not None:
                if y.shape != shape:
                    y = y.reshape(shape)
            elif y.ndim < rank:
                y = y.reshape((1,) * (rank - y.ndim) + y.shape)
            out[name] = y if cast is None else y.astype(cast)
        return out

    def close(self) -> None:
        super().close()
        if self._net is not None:
            self._net.clear()
            self._net = None


# -- backend --------------------------------------------------------------------------------------
class NcnnBackend(Backend):
    name = "ncnn"
    in_memory = True
    precisions = ("fp32", "fp16", "int8")
    calibrates_itself = True  # ncnn:int8: scales calibrated by ncnn on the fp32 model, weights quantised by ncnn
    # ncnn's int8 (symmetric per-tensor int8 inputs of Convolution/InnerProduct, symmetric per-channel weights); the
    # scales are written into the model (luodi.backends._ncnn_int8), this table only lets the sensitivity ranking
    # simulate it.
    int8_policy = {
        **VENDOR_W8A8,
        "activations": {"dtype": "int8", "symmetric": True},
        "bias_correction": True,
        "rounding": "half_away_from_zero",
        "ops": ["Conv", "Gemm", "MatMul"],
        "notes": "ncnn's int8 (luodi's MSE input scales and bias correction, weights quantised at load), approximated "
        "for the sensitivity ranking",
    }
    devices = ("cpu",)
    module = "ncnn"
    extra = "ncnn"
    crash_prone = True  # a changed layer parameter in model.param segfaults in load or extract
    compile_options: ClassVar[Mapping[str, Option]] = {
        "input_shapes": Option(dict, "shapes (input name -> list of ints) pnnx traces at when no shape sets are given"),
        "pnnx_timeout": Option((int, float), f"how many seconds pnnx may take (default {_pnnx.TIMEOUT_S})"),
        "ranges": Option(
            str,
            "int8: how each int8 layer's input scale is calibrated: mse (default: the symmetric threshold with the "
            "least expected squared error on the blob's histogram), percentile (99.999th of |x|) or maxabs "
            "(max |x|, ncnn2table's max-abs, the behaviour before); the model's inputs keep max |x|",
        ),
        "bias_correction": Option(
            (bool, str),
            "int8: correct each int8 layer's bias for the mean output error of its weights as ncnn rounds them at "
            "load, measured over the calibration samples (default true; false: ncnn's weights alone)",
        ),
    }

    def check_compile_options(self, extra: Mapping[str, Any], precision: str) -> None:
        super().check_compile_options(extra, precision)
        _int8_settings(extra)

    def available(self) -> Availability:
        base = super().available()
        if not base.ok:
            return base
        return Availability(
            True,
            devices=self.devices,
            precisions=self.precisions,
            version=base.version or _dist_version("ncnn"),
        )

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        ncnn = self.require()
        exe = _pnnx_executable()
        if exe is None:
            raise BackendUnavailableError(
                "compiling for ncnn needs the pnnx converter, which is not installed; "
                f"install it with: {self.install_hint()}"
            )
        inputs, outputs = options.io(model)
        if not inputs:
            raise CompileError("ncnn needs a model with at least one input")
        for s in inputs:
            if s.dtype != "float32":
                raise CompileError(
                    f"ncnn takes float32 inputs only; input '{s.name}' is {s.dtype}. "
                    "Cast it inside the model before export, or choose another target."
                )
        if options.precision == "int8":  # ncnn quantises a Conv's input symmetrically: pixels would keep seven bits
            model = unfold_input_normalization(model, dict(options.input_normalization or {}))
        converted = _pnnx.convert(ncnn, exe, model, inputs, outputs, options)
        artifact_options: dict[str, Any] = {
            "converter": f"pnnx {_dist_version('pnnx')}",
            "precision_flags": _precision_flags(ncnn.Option(), options.precision),
            **converted.options,
            "batch": "item by item: one extraction per item of a symbolic batch (ncnn has no batch axis)",
        }
        files = {_PARAM: converted.param, _BIN: converted.weights}
        artifact = Artifact(self.name, options.precision, files, artifact_options)
        if options.precision == "int8":
            self._quantise(ncnn, artifact, options, converted.run_at)
        self._smoke_test(artifact, converted.run_at)
        return artifact

    def _quantise(self, ncnn: Any, artifact: Artifact, options: CompileOptions, shapes: Any) -> None:
        """pnnx's fp32 model made int8 in place (luodi.backends._ncnn_int8): the fp32 model is proven to run (in a
        child), its input-blob scales calibrated by ncnn on the compile's samples, the scales written in."""
        if options.int8_io:
            raise NotApplicableError(
                "ncnn:int8 keeps float inputs and outputs (ncnn quantises each int8 layer's input itself), so "
                "--int8-io has no integer boundary to give it; drop --int8-io or this target"
            )
        samples = [dict(f) for f in options.calibration or ()]
        if not samples:
            raise CompileError("ncnn:int8 needs calibration data: pass calibration= (CLI: --calibration)")
        fp32 = Artifact(self.name, "fp32", dict(artifact.files), {**artifact.options})
        fp32.options["precision_flags"] = _precision_flags(ncnn.Option(), "fp32")
        self._smoke_test(fp32, shapes)
        param, weights = artifact.files[_PARAM], artifact.files[_BIN]
        text = param.decode("utf-8")
        layers = _ncnn_int8.int8_layers(parse_param(text), text)
        if not layers:
            raise CompileError("ncnn:int8: the model has no Convolution or InnerProduct layer to run in int8")
        with tempfile.TemporaryDirectory(prefix="luodi-ncnn-") as tmp:
            path = os.path.join(tmp, _PARAM)
            Path(path).write_bytes(param)
            log = _ncnn_int8.read_log(ncnn, path, weights)
        _ncnn_int8.place(layers, log, weights)
        ranges, bias = _int8_settings(options.extra)
        model_inputs = frozenset(d["blob"] for d in artifact.options["inputs"])
        net = _load_net(ncnn, param, weights, fp32.options["precision_flags"], None)
        try:
            blobs = list(dict.fromkeys(la["bottom"] for la in layers))
            thresholds, _, means = _ncnn_int8.calibrate(
                ncnn, net, artifact.options["inputs"], samples, blobs, ranges, model_inputs, bias
            )
        finally:
            net.clear()
        corrections = _ncnn_int8.corrected_biases(layers, means) if bias else {}
        artifact.files[_PARAM], artifact.files[_BIN] = _ncnn_int8.rewrite(
            text, weights, layers, thresholds, corrections
        )
        how = {
            "mse": "the symmetric threshold with the least expected squared error on the blob's histogram of |x|",
            "percentile": f"the {_ncnn_int8.PERCENTILE}th percentile of |x|",
            "maxabs": "max |x| (ncnn2table's max-abs)",
        }[ranges]
        artifact.options["int8"] = {
            "layers": sum(1 for la in layers if thresholds.get(la["bottom"], 0) > 0),
            "of": len(layers),
            "ranges": ranges,
            "activation_scales": f"127 / {how} over the calibration samples, by ncnn; the model's inputs: max |x|",
            "weight_scales": "127 / max |w| per output channel (ncnn2int8's); ncnn quantises the weights at load",
            "bias_correction": bias,
            "corrected_layers": len(corrections),
            "samples": len(samples),
        }

    def _smoke_test(self, artifact: Artifact, shapes: dict[str, tuple[int, ...]]) -> None:
        """Load the param with ncnn and extract every output once on zeros, to fail at compile time."""
        refused = None
        with _stderr_captured() as said:
            try:
                engine = self.load(artifact, LoadOptions(threads=1))
            except ModelError as exc:
                engine, refused = None, exc
        if engine is None:
            layers = parse_param(artifact.files[_PARAM].decode("utf-8", errors="replace"))
            reason = _load_reason(said[0], layers) if said[0].strip() or refused is None else str(refused)
            raise CompileError(f"ncnn cannot load the model pnnx wrote: {reason}")
        engine.close()
        # The run on zeros happens in a child process: ncnn may crash the process when a converted model fails to
        # run (pnnx's ddddocr: "malformed literal token", then a segfault at exit), and compile must survive it.
        from .probe import prove_in_child

        try:
            prove_in_child(artifact, [shapes], self.available().version, remember=False)
        except BackendError as exc:
            raise CompileError(
                f"ncnn loaded the converted model but could not run it on zeros at {shapes}: {exc}"
            ) from exc

    def validate(self, artifact: Artifact) -> None:
        missing = [f for f in (_PARAM, _BIN) if f not in artifact.files]
        if missing:
            raise ModelError(f"{artifact.target} artifact has no {', '.join(missing)}; recompile the package")
        validate_param(self.require(), artifact.files[_PARAM], len(artifact.files[_BIN]))

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        ncnn = self.require()
        if options.device.partition(":")[0] != "cpu":
            raise BackendUnavailableError(f"{self.name} runs on device 'cpu' only here, not '{options.device}'")
        missing = [f for f in (_PARAM, _BIN) if f not in artifact.files]
        missing += [k for k in ("inputs", "outputs") if k not in artifact.options]
        if missing:
            raise ModelError(f"{artifact.target} artifact has no {', '.join(missing)}; recompile the package")
        # The package's flags, but never a reduced precision in an fp32 target.
        flags = dict(artifact.options.get("precision_flags") or {})
        if artifact.precision == "fp32" or not flags:
            flags = {**flags, **_precision_flags(ncnn.Option(), artifact.precision)}
        self.validate(artifact)
        net = _load_net(ncnn, artifact.files[_PARAM], artifact.files[_BIN], flags, options.threads, artifact.in_memory)
        return NcnnEngine(ncnn, net, artifact.options)


def _int8_settings(extra: Mapping[str, Any]) -> tuple[str, bool]:
    """The int8 options ``ranges`` and ``bias_correction`` (a CompileError for a value ncnn:int8 does not take)."""
    ranges = extra.get("ranges", _ncnn_int8.RANGES[0])
    if ranges not in _ncnn_int8.RANGES:
        raise CompileError(f"ncnn ranges must be one of {', '.join(_ncnn_int8.RANGES)}, not '{ranges}'")
    bias = extra.get("bias_correction", True)
    if isinstance(bias, str):  # from the command line: --option ncnn.bias_correction=false
        if bias.lower() not in ("true", "false"):
            raise CompileError(f"ncnn bias_correction must be true or false, not '{bias}'")
        bias = bias.lower() == "true"
    return ranges, bool(bias)


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""
