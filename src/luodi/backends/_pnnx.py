"""The ONNX -> ncnn converter: the ``pnnx`` executable the pnnx wheel ships, driven in a temporary folder.

pnnx traces at the compiler's representative shapes (``inputshape``) and, when the graph has free dimensions, a
second time at shapes that differ on every free axis (``inputshape2``), so the ncnn graph keeps them dynamic; it
writes ``model.param`` / ``model.bin`` and a test script saying which axis of each blob it treated as the batch.
One ONNX rewrite runs before pnnx (``_lower_for_pnnx``). Kept out of the backend registry (a leading underscore):
it converts, it never loads or runs a model; luodi.backends.ncnn is the engine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import onnx_io
from ..errors import BackendUnavailableError, CompileError, UnsupportedOpError
from ..tensor import TensorSpec
from ._ncnn_param import NO_BATCH, parse_param
from .base import CompileOptions
from .onnx_compat import with_ir_version_at_most
from .shapes import primary_shapes, second_shapes

PARAM, BIN, _PY = "model.param", "model.bin", "model_ncnn.py"
TIMEOUT_S = 600
_TRACE_BATCH2 = 4  # without representative shapes: the batch's second trace size (luodi's behaviour before them)

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


def executable() -> Path | None:
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
    cmd = [str(exe), "model.onnx", *args, f"ncnnparam={PARAM}", f"ncnnbin={BIN}"]
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
    produced = all((Path(tmp) / f).is_file() for f in (PARAM, BIN))
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


@dataclass
class Converted:
    """What pnnx made of a model: the ncnn files, the per-blob entries the engine reads, the trace shapes."""

    param: bytes
    weights: bytes
    options: dict[str, Any]
    run_at: dict[str, tuple[int, ...]]
    """The shapes a first test run uses (the primary representative set)."""


def convert(
    ncnn: Any, exe: Path, model: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], options: CompileOptions
) -> Converted:
    """Convert ``model`` with pnnx at ``options``' shapes and precision; CompileError/UnsupportedOpError saying why not.

    ``ncnn`` (the engine module) only names the layer types ncnn has, so an unconverted operator is refused here.
    """
    trace1, trace2, run_at = _trace_shapes(inputs, options)
    dynamic = trace1 != trace2
    args = [f"inputshape={_shape_arg(trace1)}"]
    if dynamic:
        args.append(f"inputshape2={_shape_arg(trace2)}")
    args += [f"fp16={1 if options.precision == 'fp16' else 0}", "device=cpu", f"ncnnpy={_PY}"]
    timeout = float(options.extra.get("pnnx_timeout", TIMEOUT_S))

    with tempfile.TemporaryDirectory(prefix="luodi-pnnx-") as tmp:
        _convert(exe, tmp, _lower_for_pnnx(model), args, timeout)
        param = Path(tmp, PARAM).read_bytes()
        weights = Path(tmp, BIN).read_bytes()
        py = Path(tmp, _PY)
        batch_index = _batch_indexes(py.read_text(errors="replace") if py.is_file() else "")

    layers = parse_param(param.decode("utf-8", errors="replace"))
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
        guess = 0 if len(s.shape) > 1 and not (isinstance(s.shape[0], int) and s.shape[0] != 1) else NO_BATCH
        bi = batch_index.get(blob, guess)
        return {"blob": blob, "name": s.name, "dtype": s.dtype, "shape": list(s.shape), "batch_index": bi}

    converted = {
        "trace_shapes": {s.name: list(t) for s, t in zip(inputs, trace1)},
        "trace_shapes2": {s.name: list(t) for s, t in zip(inputs, trace2)} if dynamic else {},
        "dynamic": dynamic,
        "inputs": [entry(b, s) for b, s in zip(in_blobs, inputs)],
        "outputs": [entry(b, s) for b, s in zip(out_blobs, outputs)],
    }
    return Converted(param, weights, converted, run_at)
