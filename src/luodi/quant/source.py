"""Pre-quantised source models: whether a graph already carries int8 (QDQ pairs or QOperator nodes).

Such a model is verified as what it is: the reference evaluates its QDQ graph, and a target whose engine runs QDQ
as int8 kernels is judged with the int8 tolerance. Nothing here changes or runs the model.
"""

from __future__ import annotations

from typing import Any

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
QOPERATOR_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "ConvInteger", "MatMulInteger", "QGemm", "QAttention"}
)


def quantised_format(model: Any) -> str | None:
    """ "qdq" when the graph holds Quantize/DequantizeLinear, "qoperator" when it holds quantised operators (QLinear*,
    *Integer), None for a float model."""
    ops = {node.op_type for node in model.graph.node}
    if ops & QOPERATOR_OPS:
        return "qoperator"
    if ops & QDQ_OPS:
        return "qdq"
    return None


def tolerance_class(precision: str, source_format: str | None, runs_int8: bool) -> str:
    """The tolerance a target is verified with: int8 for a pre-quantised source on an engine that runs QDQ in int8
    kernels (one quantisation step apart from the reference's float simulation is expected there)."""
    return "int8" if source_format and runs_int8 else precision
