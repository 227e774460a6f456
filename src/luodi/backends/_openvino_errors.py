"""Reading OpenVINO's errors: its ONNX frontend's report of operators it could not convert, as a sentence naming
each operator, its opset and the model's node(s), and the reason from the detailed log. Runs no engine code.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import CompileError, UnsupportedOpError

# OpenVINO's ONNX frontend report: "-- No conversion rule found for operations: Det-17, ai.onnx.ml.X"
# and "-- Conversion is failed for: RandomUniformLike-21".
_UNCONVERTED = re.compile(r"(?:No conversion rule found for operations|Conversion is failed for):\s*(.+)")
_OP_TOKEN = re.compile(r"^(?:(?P<domain>[A-Za-z_][\w.]*)\.)?(?P<op>[A-Za-z_]\w*)(?:-(?P<version>\d+))?$")


def last_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else msg)[:500]


def _nodes_of(model: Any, op: str, domain: str) -> list[str]:
    """Names of the nodes (subgraphs included) running ``domain``.``op``; unnamed ones by output."""
    found: list[str] = []

    def walk(graph: Any) -> None:
        for node in graph.node:
            if node.op_type == op and (node.domain if node.domain != "ai.onnx" else "") == domain:
                found.append(node.name or f"<unnamed, output {node.output[0] if node.output else '?'}>")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return found


def _conversion_reason(msg: str, token: str) -> str:
    """The last line of the frontend's detailed log for ``token`` ("-- Conv-17 with a message:\n...\n"):
    the reason the conversion failed (e.g. a channel count that does not match), or ""."""
    m = re.search(rf"^-- {re.escape(token)} with a message:\s*\n(.*?)(?=^-- |^Summary:|\Z)", msg, re.S | re.M)
    if not m:
        return ""
    lines = [ln.strip() for ln in m[1].splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _unsupported_from_message(msg: str, model: Any) -> str | None:
    """A sentence naming every operator OpenVINO's report lists, with its nodes, or None."""
    parts = []
    for line in _UNCONVERTED.findall(msg):
        for token in (t.strip() for t in line.split(",")):
            m = _OP_TOKEN.match(token)
            if not m:
                continue
            op, domain, version = m["op"], m["domain"] or "", m["version"]
            nodes = _nodes_of(model, op, domain)
            qual = f"{domain}.{op}" if domain else op
            opset = f" (opset {version})" if version else ""
            where = (
                "at node "
                + ", ".join(f"'{n}'" for n in nodes[:5])
                + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
                if nodes
                else "(inside a function or expanded operator of the model)"
            )
            why = _conversion_reason(msg, token)
            parts.append(f"operator {qual}{opset} {where}" + (f" ({why})" if why else ""))
    if not parts:
        return None
    return "; ".join(dict.fromkeys(parts))


def raise_read_error(exc: Exception, model: Any, backend: str) -> None:
    msg = str(exc)
    what = _unsupported_from_message(msg, model)
    if what:
        raise UnsupportedOpError(
            f"{backend} cannot run {what}; try another target or replace the operator before export"
        ) from exc
    raise CompileError(f"{backend} could not read the model: {last_line(msg)}") from exc
