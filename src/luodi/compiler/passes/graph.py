"""Small read/rewrite helpers over an onnx GraphProto that the passes share.

They never change what the graph computes on their own; each pass decides what to rewrite.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


class _Constants(dict):
    """name -> numpy array, each converted from its initializer on first use: a pass that reads a few weights of a
    model with gigabytes of them copies only those."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        super().__init__()
        self._tensors = tensors

    def __missing__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        array = numpy_helper.to_array(self._tensors[name])  # KeyError when there is no such constant
        self[name] = array
        return array

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self._tensors

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default  # noqa: SIM401 (dict.get would skip __missing__)


def initializer_arrays(graph: Any) -> dict[str, np.ndarray]:
    """Initializers that are constants (not overridable graph inputs), as numpy arrays (converted when first read)."""
    overridable = {i.name for i in graph.input}
    return _Constants({t.name: t for t in graph.initializer if t.name not in overridable})


def consumers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it (subgraph reads included, so they count as uses)."""
    uses: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                uses[name].append(node)
        for name in _subgraph_reads(node):
            uses[name].append(node)
    return uses


def producers(graph: Any) -> dict[str, Any]:
    """Tensor name -> the node that writes it."""
    return {out: node for node in graph.node for out in node.output if out}


def _subgraph_reads(node: Any) -> set[str]:
    """Names an If/Loop/Scan body reads from the enclosing scope."""
    from onnx import AttributeProto

    reads: set[str] = set()
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            local = {i.name for i in body.input} | {t.name for t in body.initializer}
            for inner in body.node:
                local.update(inner.output)
            for inner in body.node:
                reads.update(n for n in inner.input if n and n not in local)
                reads.update(n for n in _subgraph_reads(inner) if n not in local)
    return reads


def rename_tensor(graph: Any, old: str, new: str, producers: bool = False) -> None:
    """Make every reader of ``old`` read ``new`` instead (graph outputs included); with ``producers``
    the node writing ``old`` writes ``new`` too."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if producers:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def replace_initializer(graph: Any, name: str, array: np.ndarray) -> None:
    """Set initializer ``name`` to ``array``, adding it if it does not exist."""
    from onnx import numpy_helper

    # np.asarray keeps a 0-d scalar 0-d (np.ascontiguousarray made it shape (1,): a Pad's constant_value must be a
    # scalar, and onnx2tf refuses a one-element tensor there)
    tensor = numpy_helper.from_array(np.asarray(array, order="C"), name)
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


def fresh_name(graph: Any, base: str) -> str:
    """A tensor name not used anywhere in ``graph``, starting from ``base``."""
    used = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        used.update(node.output)
    name, n = base, 1
    while name in used:
        name, n = f"{base}_{n}", n + 1
    return name


def attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def set_attribute(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
