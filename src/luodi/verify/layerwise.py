"""Layer-wise comparison of two luodi targets: every intermediate tensor made an output ("mark all", as
Polygraphy does), run on each target's engine, compared name by name in graph order.

Marking tensors as outputs can stop an engine fusing across them, as in Polygraphy; the end outputs are also
compared unmarked by `luodi verify`. It reads packages and runs engines; it changes no package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import CompileOptions, LoadOptions, get_backend
from ..errors import CompileError

JUMP_DB = 30.0  # a tensor whose SNR first falls below this (from above) is where the error "jumps"
JUMP_COSINE = 0.999  # for an engine's own table (cosine only): the first layer whose own error drops below this


@dataclass(frozen=True)
class LayerRow:
    tensor: str
    op: str
    node: str
    cosine: float
    snr_db: float
    max_abs: float


@dataclass
class LayerReport:
    a: str
    b: str
    rows: list[LayerRow]
    first_jump: int | None  # index into rows, or None when no tensor falls below JUMP_DB
    marked: str = f"first tensor below {JUMP_DB:.0f} dB marked"
    """What the marked row is (an engine's own table marks by cosine)."""

    def table(self) -> list[dict[str, Any]]:
        return [r.__dict__ | {"jump": i == self.first_jump} for i, r in enumerate(self.rows)]


def _float_tensors(model: Any) -> list[tuple[str, str, str]]:
    """(tensor, op, node) for every float output of a node, in graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    return [
        (o, n.op_type, n.name)
        for n in model.graph.node
        for o in n.output
        if o and types.get(o) == onnx.TensorProto.FLOAT and n.op_type not in ("Constant", "QuantizeLinear")
    ]


def _visible(model: Any, tensor: str) -> str:
    """In a QDQ graph the value the next layer sees is the DequantizeLinear after a tensor's QuantizeLinear
    (where the quantiser folded a ReLU into the Q, the tensor itself is the pre-activation value)."""
    q = next((n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor), None)
    if q is None:
        return tensor
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]), None)
    return dq.output[0] if dq is not None else tensor


def _marked(model: Any, names: dict[str, str]) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for visible in names.values():
        if visible not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(visible, onnx.TensorProto.FLOAT, None))
            present.add(visible)
    return out


def _source_graph(package: Any, target: dict[str, Any]) -> Any:
    from ..extras import require

    onnx = require("onnx", "layer-wise verification")

    q = target.get("quantization")
    if q and q.get("model"):
        return onnx.load_model_from_string(package.read(q["model"]))
    return package.model()


def run_marked(package: Any, target: dict[str, Any], tensors: list[str], feeds: dict[str, np.ndarray]) -> dict:
    """Every tensor in ``tensors`` that the target's graph has, as computed by the target's engine."""
    graph = _source_graph(package, target)
    have = {o for n in graph.graph.node for o in n.output}
    names = {t: _visible(graph, t) for t in tensors if t in have}
    backend = get_backend(target["backend"])
    try:
        artifact = backend.compile(_marked(graph, names), CompileOptions(precision=target["precision"]))
        engine = backend.load(artifact, LoadOptions())
    except Exception as exc:  # an engine that cannot take the marked graph says so, naming itself
        raise CompileError(
            f"{target['backend']}:{target['precision']} cannot run the graph with every tensor marked as an "
            f"output: {exc}"
        ) from exc
    try:
        got = engine.run(feeds)
    finally:
        engine.close()
    return {t: got[v] for t, v in names.items() if v in got}


def toolkit_layers(package: Any, target: dict[str, Any], feeds: dict[str, np.ndarray]) -> LayerReport | None:
    """The layer-wise table of a target whose engine reports its own (``Backend.layer_errors``, e.g. rknn's
    accuracy_analysis on its simulator: its quantised run against its own float run, per tensor of its graph, where
    luodi cannot mark tensors of a vendor file); None for other engines. SNR and max abs are not reported (NaN); the
    marked row is the first whose own single-layer cosine falls below JUMP_COSINE."""
    backend = get_backend(target["backend"])
    errors = getattr(backend, "layer_errors", None)
    if errors is None:
        return None
    rows_in = errors(package.artifact(target), feeds)
    rows = [LayerRow(r["tensor"], r["op"], r["op"], r["cosine"], float("nan"), float("nan")) for r in rows_in]
    first = next((i for i, r in enumerate(rows_in) if r["single_cosine"] < JUMP_COSINE), None)
    label = f"{target['backend']}:{target['precision']}"
    marked = f"the engine's own table, cosine only; first layer whose own cosine < {JUMP_COSINE} marked"
    return LayerReport(f"{label} (its own float run)", label, rows, first, marked)


def layerwise(package: Any, a: dict[str, Any], b: dict[str, Any], feeds: dict[str, np.ndarray]) -> LayerReport:
    """Compare every intermediate float tensor of the canonical graph between targets ``a`` and ``b``; for a ``b``
    whose engine reports its own layer-wise errors (a vendor NPU file), that table (see :func:`toolkit_layers`)."""
    own = toolkit_layers(package, b, feeds)
    if own is not None:
        return own
    from ..quant.sensitivity import cosine, snr_db

    rows_spec = _float_tensors(package.model())
    tensors = [t for t, _, _ in rows_spec]
    got_a = run_marked(package, a, tensors, feeds)
    got_b = run_marked(package, b, tensors, feeds)
    rows = []
    for tensor, op, node in rows_spec:
        if tensor in got_a and tensor in got_b and got_a[tensor].shape == got_b[tensor].shape:
            x, y = np.asarray(got_a[tensor]), np.asarray(got_b[tensor])
            diff = float(np.abs(x.astype(np.float64) - y).max(initial=0.0))
            rows.append(LayerRow(tensor, op, node, cosine(x, y), snr_db(x, y), diff))
    first = None
    for i, r in enumerate(rows):
        before = rows[i - 1].snr_db if i else float("inf")
        if r.snr_db < JUMP_DB <= before:
            first = i
            break
    label = f"{a['backend']}:{a['precision']}", f"{b['backend']}:{b['precision']}"
    return LayerReport(label[0], label[1], rows, first)
