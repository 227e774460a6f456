"""ncnn (Tencent): a small, dependency-free CPU engine, with the ONNX -> ncnn conversion done by pnnx.

Compile writes the canonical graph to a temporary folder and runs the ``pnnx`` executable that the
``pnnx`` wheel ships (the ncnn wheels have no onnx2ncnn; pnnx's Python API needs torch and only
wraps the same executable). pnnx traces at the compiler's representative shapes (``inputshape``)
and, when the graph has free dimensions, a second time at shapes that differ on every free axis
(``inputshape2``: the batch at 4, other free axes at the next representative size), so pnnx keeps
the shape arithmetic of batch, height, width and sequence dynamic; tracing a free width at 1
alone froze it there (an OCR model then gave (1,1,C) for (60,1,C)). Without representative shapes
free dims are traced at 1. The result is ``model.param`` / ``model.bin``; ncnn names the blobs ``in0, in1, ...`` and
``out0, out1, ...`` in the ONNX graph's input/output order, and the artifact options record that
mapping. Compile then loads the param with ``ncnn.Net`` and extracts every output once on zeros,
so an operator that pnnx or ncnn cannot handle (left as a raw ONNX op name, ``pnnx.Expression``,
``torch.*``/``F.*``, ...) is an ``UnsupportedOpError`` naming the op, its node(s) and "ncnn" at
compile time, not at the first forward.

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

**Lowering.** One ONNX rewrite runs before pnnx: ``Gemm(transB=1)`` whose weight is not a constant
becomes ``Transpose + Gemm(transB=0)`` (pnnx would emit ``F.linear``, which ncnn cannot run with a
run-time weight).

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
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from ..tensor import TensorSpec, specs_from_onnx
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions, memory_file
from .onnx_compat import with_ir_version_at_most
from .shapes import primary_shapes, second_shapes

_PARAM, _BIN, _PY = "model.param", "model.bin", "model_ncnn.py"
_PNNX_TIMEOUT_S = 600
_TRACE_BATCH2 = 4  # without representative shapes: the batch's second trace size (luodi's behaviour before them)
_NO_BATCH = 233  # pnnx's and ncnn's "this tensor has no batch axis": the whole array is one Mat
_FP16_ON = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic")
# pnnx's names for what it could not lower, back to the ONNX operators they come from (for messages)
_PNNX_TO_ONNX = {
    "linear": ("Gemm", "MatMul"),
    "interpolate": ("Resize", "Upsample"),
    "upsample": ("Resize", "Upsample"),
    "matmul": ("MatMul", "Gemm"),
    "conv2d": ("Conv",),
    "conv1d": ("Conv",),
    "conv3d": ("Conv",),
    "pad": ("Pad",),
    "grid_sample": ("GridSample",),
}
_LOW_PRECISION = re.compile(r"^use_(fp16|bf16|int8)_")


# -- pnnx -----------------------------------------------------------------------------------------
def _pnnx_executable() -> Path | None:
    """The ``pnnx`` binary inside the installed pnnx package, found without importing it (torch)."""
    try:
        spec = importlib.util.find_spec("pnnx")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = "pnnx.exe" if sys.platform == "win32" else "pnnx"
    for folder in spec.submodule_search_locations:
        path = Path(folder) / exe
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _shape_arg(shapes: list[tuple[int, ...]]) -> str:
    return ",".join("[" + ",".join(str(d) for d in s) + "]f32" for s in shapes)


def _tail(text: str, lines: int = 12) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_ORT_FAILED = re.compile(r"ort (?:Run|CreateSession) failed (?:\S+\.cc:\d+ .*?\) )?(.*)")
_LIBC = re.compile(r"(free\(\): .*|double free.*|corrupted .*|what\(\): .*|Assertion .*|std::bad_alloc.*)")
_PROBLEM = re.compile(r"(?i)\b(error|failed|unsupported|not supported|cannot|invalid|unknown)\b")
_STAGE = re.compile(r"^#+\s*(.+?)\s*$")


class _IrTooNew(CompileError):
    """pnnx's bundled ONNX reader is older than the file's IR version; ``max_ir`` is the newest it reads."""

    def __init__(self, message: str, max_ir: int) -> None:
        super().__init__(message)
        self.max_ir = max_ir


def _pnnx_failure(returncode: int, log: str) -> str:
    """One line saying why pnnx failed: the exit (a signal by name), the pass it was in and the cause from its log
    (pnnx prints the real reason, e.g. onnxruntime's, long before it dies of SIGSEGV)."""
    lines = [ln.strip() for ln in _ANSI.sub("", log).splitlines() if ln.strip()]
    if returncode < 0:
        try:
            how = f"crashed with {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"crashed with signal {-returncode}"
    else:
        how = f"failed (exit code {returncode})"
    stage = next((m[1] for ln in reversed(lines) if (m := _STAGE.match(ln))), "")
    cause = ""
    for ln in lines:
        m = _ORT_FAILED.search(ln)
        if m:
            cause = f"pnnx's shape inference (onnxruntime) failed: {m[1]}"
            break
    if not cause:
        cause = next((m[1] for ln in reversed(lines) if (m := _LIBC.search(ln))), "")
    if not cause:
        cause = next((ln for ln in reversed(lines) if _PROBLEM.search(ln) and "cpuid_info" not in ln), "")
    where = f" in {stage}" if stage else ""
    return f"pnnx {how}{where}" + (f": {cause[:400]}" if cause else " (its log gives no reason)")


def _run_pnnx(exe: Path, tmp: str, args: list[str], timeout: float) -> str:
    cmd = [str(exe), "model.onnx", *args, f"ncnnparam={_PARAM}", f"ncnnbin={_BIN}"]
    try:
        proc = subprocess.run(
            cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise CompileError(f"pnnx did not convert the model for ncnn within {timeout:.0f} s:\n{_tail(out)}") from None
    except OSError as exc:
        raise BackendUnavailableError(
            f"pnnx could not be started ({exc}); reinstall it: pip install 'luodi[ncnn]'"
        ) from exc
    produced = all((Path(tmp) / f).is_file() for f in (_PARAM, _BIN))
    if proc.returncode != 0 or not produced:
        shapes = " ".join(a for a in args if a.startswith("inputshape"))
        reason = _pnnx_failure(proc.returncode, proc.stdout)
        message = f"ncnn: {reason} (converting at {shapes})"
        m = _IR_TOO_NEW.search(proc.stdout)
        if m:
            raise _IrTooNew(message, int(m[2]))
        raise CompileError(message)
    return proc.stdout


def _convert(exe: Path, tmp: str, model: Any, args: list[str], timeout: float) -> None:
    """Run pnnx on ``model``; once more with the IR version lowered when pnnx reads only older files and the
    model uses nothing newer (onnx_compat)."""
    onnx_io.save(model, Path(tmp, "model.onnx"))  # + model.onnx.data over 2 GB
    try:
        _run_pnnx(exe, tmp, args, timeout)
    except _IrTooNew as exc:
        older = with_ir_version_at_most(model, exc.max_ir)
        if older is None or older is model:
            raise CompileError(
                f"{exc} and the model uses operator sets or types newer than IR {exc.max_ir}: re-export it with an "
                "older opset, or choose another target"
            ) from None
        onnx_io.save(older, Path(tmp, "model.onnx"))
        _run_pnnx(exe, tmp, args, timeout)


def _batch_indexes(py: str) -> dict[str, int]:
    """Each blob's batch axis from the ncnn test script pnnx writes (233: the blob has none)."""
    found = {m[0]: int(m[1]) for m in re.findall(r'ex\.input\("(\w+)",\s*ncnn\.Mat\(.*?batch_index=(\d+)', py)}
    mats = dict(re.findall(r'_,\s*(\w+)\s*=\s*ex\.extract\("(\w+)"\)', py))
    for var, bi in re.findall(r"(\w+)\.numpy\(batch_index=(\d+)\)", py):
        if var in mats:
            found[mats[var]] = int(bi)
    return found


def _lower_for_pnnx(model: Any) -> Any:
    """Rewrites that let pnnx map an ONNX pattern onto an ncnn layer; the model itself when none apply.

    Gemm(transB=1) with a weight that is not a constant becomes F.linear in pnnx, which has no ncnn
    layer with a run-time weight; Transpose(B) + Gemm(transB=0) lowers to Permute + ncnn Gemm.
    """
    from onnx import ModelProto, helper

    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}

    def trans_b(node: Any) -> bool:
        return any(a.name == "transB" and a.i == 1 for a in node.attribute)

    todo = [
        i
        for i, n in enumerate(graph.node)
        if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] not in constants and trans_b(n)
    ]
    if not todo:
        return model
    lowered = ModelProto()
    lowered.CopyFrom(model)
    nodes = lowered.graph.node
    for shift, i in enumerate(todo):
        node = nodes[i + shift]
        weight_t = f"{node.input[1]}__luodi_ncnn_T{i}"
        transpose = helper.make_node(
            "Transpose", [node.input[1]], [weight_t], name=f"{node.name}__luodi_T", perm=[1, 0]
        )
        node.input[1] = weight_t
        for a in node.attribute:
            if a.name == "transB":
                a.i = 0
        nodes.insert(i + shift, transpose)
    return lowered


def _trace_shapes(
    inputs: list[TensorSpec], options: CompileOptions
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """pnnx's ``inputshape`` and ``inputshape2`` (equal when the model has no free dim) and the shapes the
    compile-time test run uses.

    With representative shapes (``options.shapes``) pnnx traces at the first set and at the next sizes the sets
    give each free axis (height, width, sequence), so those stay dynamic in the ncnn graph; an axis the sets keep
    at one size is traced at it. A symbolic batch is traced at 1 in both: ncnn has no batch axis and runs a batch
    item by item, so the graph only ever sees one item, and a second trace at batch 4 made pnnx convert PP-OCRv4's
    recogniser wrongly (0.67 max error on its softmax, silently) or die (SIGABRT, "free(): invalid next size").
    Without
    shapes, free dims other than the batch are traced at 1 unless ``options.extra["input_shapes"]`` gives them,
    and the batch at 1 and 4 (luodi's behaviour before shapes were known).
    """

    def batched(s: TensorSpec) -> bool:
        return bool(s.shape) and not isinstance(s.shape[0], int)

    def with_batch(s: TensorSpec, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
        return (n, *shape[1:]) if batched(s) else tuple(shape)

    if options.shapes:
        primary = primary_shapes(inputs, options)
        second = second_shapes(inputs, primary, options) or primary
        trace1 = [with_batch(s, primary[s.name], 1) for s in inputs]
        trace2 = [with_batch(s, second[s.name], 1) for s in inputs]
        return trace1, trace2, primary
    overrides = dict(options.extra.get("input_shapes") or {})
    trace1, trace2 = [], []
    for s in inputs:
        given = overrides.get(s.name)
        shape = tuple(int(d) for d in given) if given is not None else s.concrete(1)
        if len(shape) != len(s.shape):
            raise CompileError(f"input_shapes['{s.name}'] = {given} does not match its shape {s.shape_str()}")
        trace1.append(with_batch(s, shape, 1))
        trace2.append(with_batch(s, shape, _TRACE_BATCH2))
    return trace1, trace2, {s.name: t for s, t in zip(inputs, trace1)}


# -- the .param file ------------------------------------------------------------------------------
def _parse_param(text: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(type, name, bottoms, tops) per layer of an ncnn text .param."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != ["7767517"]:
        raise CompileError("pnnx wrote an ncnn .param without the 7767517 magic; it is not a usable ncnn model")
    layers = []
    for parts in lines[2:]:
        ltype, lname, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        layers.append((ltype, lname, parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]))
    return layers


def _check_layers(ncnn: Any, model: Any, layers: list[tuple[str, str, list[str], list[str]]]) -> None:
    """Raise UnsupportedOpError for every layer type ncnn has no implementation of."""
    unknown = [(t, n, b, o) for t, n, b, o in layers if ncnn.layer_to_index(t) < 0]
    if not unknown:
        return
    unknown_types = {t for t, *_ in unknown}
    consumers: dict[str, list[str]] = {}
    for ltype, _, bottoms, _ in layers:
        for blob in bottoms:
            consumers.setdefault(blob, []).append(ltype)
    nodes_by_op: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        nodes_by_op.setdefault(node.op_type.lower(), []).append(node.name or f"#{i} ({node.op_type})")
    problems: dict[str, str] = {}
    for ltype, lname, _, tops in unknown:
        if ltype.startswith("pnnx.Expression"):
            users = sorted({u for blob in tops for u in consumers.get(blob, [])})
            if any(u in unknown_types for u in users):
                continue  # its consumer is reported by name; the expression is a by-product
            problems.setdefault(
                "pnnx.Expression",
                "pnnx.Expression (shape/scalar arithmetic pnnx could not lower, feeding "
                f"{', '.join(users) or 'nothing'}; layer '{lname}')",
            )
            continue
        op = ltype.split("::")[-1].split(".")[-1]
        nodes = nodes_by_op.get(op.lower(), [])
        for onnx_op in _PNNX_TO_ONNX.get(op.lower(), ()) if not nodes else ():
            if onnx_op.lower() in nodes_by_op:
                op, nodes = onnx_op, nodes_by_op[onnx_op.lower()]
                break
        where = f"node(s) {', '.join(repr(n) for n in nodes[:5])}" if nodes else f"layer '{lname}'"
        if len(nodes) > 5:
            where += f" and {len(nodes) - 5} more"
        label = op if ltype == op else f"{op} (pnnx layer type '{ltype}')"
        problems.setdefault(ltype, f"{label} at {where}")
    listing = "; ".join(problems.values())
    raise UnsupportedOpError(
        f"ncnn cannot run operator {listing}: pnnx left it unconverted and ncnn has no such layer; "
        "try another target or replace the operator before export"
    )


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


# -- validating a package's .param before ncnn reads it -------------------------------------------
_MAX_PARAM_ID = 32  # ncnn's NCNN_MAX_PARAM_COUNT: ids 0..31, arrays as -23300 - id
_ARRAY_BASE = -23300
_MAX_COUNT = 1 << 20  # layers, blobs, a layer's bottoms/tops, an array's length
_INT32 = 1 << 31
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|nan|inf)$", re.IGNORECASE)
# Layers whose weights pnnx writes with a 4-byte storage tag, then at least 2 bytes (fp16) per weight:
# type -> (the param id of the weight count, of num_output, of bias_term). Enough for a lower bound on model.bin.
_WEIGHTED = {
    "Convolution": (6, 0, 5),
    "ConvolutionDepthWise": (6, 0, 5),
    "Deconvolution": (6, 0, 5),
    "DeconvolutionDepthWise": (6, 0, 5),
    "Convolution1D": (6, 0, 5),
    "Convolution3D": (6, 0, 5),
    "InnerProduct": (2, 0, 1),
}
# Convolution*/Deconvolution*: 19=1 takes the weights from a second input blob (pnnx, for ONNX weights as inputs)
_DYNAMIC_WEIGHT = 19
# Parameters that ncnn divides by, allocates with or loops over, which must be >= 1 (id -> default).
_POSITIVE = {
    "Convolution": {0: None, 1: None, 2: 1, 3: 1, 6: None},
    "ConvolutionDepthWise": {0: None, 1: None, 2: 1, 3: 1, 6: None, 7: 1},
    "InnerProduct": {0: None, 2: None},
}


def _number(token: str, where: str) -> float | int:
    if not _NUMBER.match(token):
        raise ModelError(f"{where}: '{token[:40]}' is not a number")
    if any(c in token for c in ".eEnN"):  # ncnn reads a value with a dot or an exponent as a float
        return float(token)
    value = int(token)
    if not -_INT32 <= value < _INT32:
        raise ModelError(f"{where}: {value} does not fit ncnn's 32-bit integers")
    return value


def _layer_params(tokens: list[str], where: str) -> dict[int, Any]:
    params: dict[int, Any] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq or not re.fullmatch(r"-?\d+", key):
            raise ModelError(f"{where}: parameter '{tok[:40]}' is not id=value")
        pid = int(key)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            # A string parameter (ncnn reads it verbatim), e.g. Reshape's shape expression 6="0w,120" from pnnx.
            index, parsed = pid, value[1:-1]
            if len(parsed) > 255 or "\0" in parsed or '"' in parsed:  # ncnn reads at most 255 characters
                raise ModelError(f"{where}: parameter {pid} is a malformed string")
        elif pid <= _ARRAY_BASE:
            index = _ARRAY_BASE - pid
            items = value.split(",")
            count = _number(items[0], f"{where} parameter {pid}")
            if not isinstance(count, int) or count != len(items) - 1 or count > _MAX_COUNT:
                raise ModelError(f"{where}: array parameter {pid} declares {items[0]} values and has {len(items) - 1}")
            parsed: Any = [_number(v, f"{where} parameter {pid}") for v in items[1:]]
        else:
            index = pid
            parsed = _number(value, f"{where} parameter {pid}")
        if not 0 <= index < _MAX_PARAM_ID:
            raise ModelError(f"{where}: parameter id {pid} is outside ncnn's 0..{_MAX_PARAM_ID - 1}")
        if index in params:
            raise ModelError(f"{where}: parameter {index} is given twice")
        params[index] = parsed
    return params


def _validate_param(ncnn: Any, param: bytes, bin_size: int) -> None:
    """Refuse a .param that ncnn would misread: structure, blob graph, layer types, parameter ids and values.

    ncnn trusts its files: a changed layer parameter can make it read or write out of bounds (a segfault, not
    an error). What can be checked from the text is checked here; the probe (luodi.backends.probe) proves the rest.
    """
    try:
        text = param.decode("ascii")
    except UnicodeDecodeError:
        raise ModelError("the ncnn target's model.param is not ASCII text; recompile the package") from None
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != ["7767517"]:
        raise ModelError("the ncnn target's model.param does not start with ncnn's magic 7767517; recompile it")
    if len(lines[1]) != 2 or not all(t.isdigit() for t in lines[1]):
        raise ModelError("the ncnn target's model.param line 2 must be '<layer count> <blob count>'")
    layer_count, blob_count = int(lines[1][0]), int(lines[1][1])
    if not 0 < layer_count <= _MAX_COUNT or not 0 < blob_count <= _MAX_COUNT or layer_count != len(lines) - 2:
        raise ModelError(
            f"the ncnn target's model.param declares {lines[1][0]} layers and {lines[1][1]} blobs "
            f"and has {len(lines) - 2} layer lines; recompile the package"
        )
    produced: set[str] = set()
    min_weights = 0
    for number, parts in enumerate(lines[2:], start=1):
        where = f"model.param layer {number}"
        if len(parts) < 4 or not parts[2].isdigit() or not parts[3].isdigit():
            raise ModelError(f"{where}: expected '<type> <name> <bottoms> <tops> ...'")
        ltype, nb, nt = parts[0], int(parts[2]), int(parts[3])
        where = f"model.param layer {number} ({ltype} '{parts[1][:40]}')"
        if nb > _MAX_COUNT or nt > _MAX_COUNT or len(parts) < 4 + nb + nt:
            raise ModelError(f"{where}: declares {nb} inputs and {nt} outputs but names fewer blobs")
        if ncnn.layer_to_index(ltype) < 0:
            raise ModelError(f"{where}: ncnn has no layer type '{ltype[:40]}'")
        bottoms, tops = parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]
        missing = [b for b in bottoms if b not in produced]
        if missing:
            raise ModelError(f"{where}: reads blob(s) {missing[:5]} that no earlier layer produces")
        again = [t for t in tops if t in produced] + [t for i, t in enumerate(tops) if t in tops[:i]]
        if again:
            raise ModelError(f"{where}: produces blob(s) {again[:5]} that already exist")
        produced.update(tops)
        params = _layer_params(parts[4 + nb + nt :], where)
        for pid, default in _POSITIVE.get(ltype, {}).items():
            value = params.get(pid, default)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ModelError(f"{where}: parameter {pid} is {value!r}; ncnn needs an integer >= 1 there")
        if ltype in _WEIGHTED and params.get(_DYNAMIC_WEIGHT) == 1 and nb < 2:
            raise ModelError(f"{where}: takes its weights from an input (19=1) but has {nb} input(s)")
        if ltype in _WEIGHTED and params.get(_DYNAMIC_WEIGHT) != 1:  # dynamic weights come in as a blob, not from .bin
            count_id, out_id, bias_id = _WEIGHTED[ltype]
            count, outputs = params.get(count_id, 0), params.get(out_id, 0)
            if isinstance(count, int) and isinstance(outputs, int) and outputs > 0 and count % outputs:
                raise ModelError(f"{where}: {count} weights are not a multiple of its {outputs} outputs")
            bias = outputs if params.get(bias_id, 0) == 1 and isinstance(outputs, int) else 0
            min_weights += 4 + 2 * max(int(count), 0) + 4 * max(bias, 0)
    if len(produced) != blob_count:
        raise ModelError(
            f"the ncnn target's model.param declares {blob_count} blobs and its layers make {len(produced)}"
        )
    if min_weights > bin_size:
        raise ModelError(
            f"the ncnn target's model.bin has {bin_size} bytes, fewer than the {min_weights} its layers' weights "
            "need; the package is damaged: recompile it"
        )


# -- ncnn options ---------------------------------------------------------------------------------
def _precision_flags(opt: Any, precision: str) -> dict[str, bool]:
    names = sorted(a for a in dir(opt) if _LOW_PRECISION.match(a))
    return {a: precision == "fp16" and a in _FP16_ON for a in names}


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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
    int8_unsupported = (
        "ncnn runs int8 from its own calibration table (ncnn2table + ncnn2int8), and the ncnn/pnnx wheels ship "
        "neither tool"
    )
    precisions = ("fp32", "fp16")
    devices = ("cpu",)
    module = "ncnn"
    extra = "ncnn"
    crash_prone = True  # a changed layer parameter in model.param segfaults in load or extract

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

    def compile(self, model: Any, options: CompileOptions) -> Artifact:
        ncnn = self.require()
        if options.precision not in self.precisions:
            raise CompileError(
                f"{self.name} has no precision '{options.precision}'; choose one of {list(self.precisions)}"
            )
        exe = _pnnx_executable()
        if exe is None:
            raise BackendUnavailableError(
                "compiling for ncnn needs the pnnx converter, which is not installed; "
                f"install it with: {self.install_hint()}"
            )
        # the compiler's specs, computed once; the graph's own when a caller gives none
        inputs, outputs = (
            (list(options.inputs), list(options.outputs))
            if options.inputs and options.outputs
            else specs_from_onnx(model)
        )
        if not inputs:
            raise CompileError("ncnn needs a model with at least one input")
        for s in inputs:
            if s.dtype != "float32":
                raise CompileError(
                    f"ncnn takes float32 inputs only; input '{s.name}' is {s.dtype}. "
                    "Cast it inside the model before export, or choose another target."
                )
        trace1, trace2, run_at = _trace_shapes(inputs, options)
        dynamic = trace1 != trace2
        args = [f"inputshape={_shape_arg(trace1)}"]
        if dynamic:
            args.append(f"inputshape2={_shape_arg(trace2)}")
        args += [f"fp16={1 if options.precision == 'fp16' else 0}", "device=cpu", f"ncnnpy={_PY}"]
        timeout = float(options.extra.get("pnnx_timeout", _PNNX_TIMEOUT_S))

        with tempfile.TemporaryDirectory(prefix="luodi-pnnx-") as tmp:
            _convert(exe, tmp, _lower_for_pnnx(model), args, timeout)
            param = Path(tmp, _PARAM).read_bytes()
            weights = Path(tmp, _BIN).read_bytes()
            py = Path(tmp, _PY)
            batch_index = _batch_indexes(py.read_text(errors="replace") if py.is_file() else "")

        layers = _parse_param(param.decode("utf-8", errors="replace"))
        _check_layers(ncnn, model, layers)
        in_blobs = [tops[0] for t, _, _, tops in layers if t == "Input"]
        all_tops = {blob for *_, tops in layers for blob in tops}
        out_blobs = [f"out{i}" for i in range(len(outputs))]
        if in_blobs != [f"in{i}" for i in range(len(inputs))] or not set(out_blobs) <= all_tops:
            raise CompileError(
                f"pnnx produced blobs inputs={in_blobs}, missing outputs "
                f"{sorted(set(out_blobs) - all_tops)} for a model with {len(inputs)} input(s) and "
                f"{len(outputs)} output(s); ncnn cannot map them to the ONNX names"
            )

        def entry(blob: str, s: TensorSpec) -> dict[str, Any]:
            # pnnx's batch axis for the blob (it drops it from the Mat), or 233: none, the whole array
            guess = 0 if len(s.shape) > 1 and not (isinstance(s.shape[0], int) and s.shape[0] != 1) else _NO_BATCH
            bi = batch_index.get(blob, guess)
            return {"blob": blob, "name": s.name, "dtype": s.dtype, "shape": list(s.shape), "batch_index": bi}

        artifact_options: dict[str, Any] = {
            "converter": f"pnnx {_dist_version('pnnx')}",
            "precision_flags": _precision_flags(ncnn.Option(), options.precision),
            "trace_shapes": {s.name: list(t) for s, t in zip(inputs, trace1)},
            "trace_shapes2": {s.name: list(t) for s, t in zip(inputs, trace2)} if dynamic else {},
            "dynamic": dynamic,
            "batch": "item by item: one extraction per item of a symbolic batch (ncnn has no batch axis)",
            "inputs": [entry(b, s) for b, s in zip(in_blobs, inputs)],
            "outputs": [entry(b, s) for b, s in zip(out_blobs, outputs)],
        }
        artifact = Artifact(self.name, options.precision, {_PARAM: param, _BIN: weights}, artifact_options)
        self._smoke_test(artifact, run_at)
        return artifact

    def _smoke_test(self, artifact: Artifact, shapes: dict[str, tuple[int, ...]]) -> None:
        """Load the param with ncnn and extract every output once on zeros, to fail at compile time."""
        refused = None
        with _stderr_captured() as said:
            try:
                engine = self.load(artifact, LoadOptions(threads=1))
            except ModelError as exc:
                engine, refused = None, exc
        if engine is None:
            layers = _parse_param(artifact.files[_PARAM].decode("utf-8", errors="replace"))
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
        _validate_param(self.require(), artifact.files[_PARAM], len(artifact.files[_BIN]))

    def load(self, artifact: Artifact, options: LoadOptions) -> Engine:
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


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""
