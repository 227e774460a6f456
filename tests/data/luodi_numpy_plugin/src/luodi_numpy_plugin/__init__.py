"""A luodi backend living in its own installable package, found through the ``luodi.backends`` entry point.

NumpyBackend is a small real inference engine: it executes ONNX graphs made of dense-network operators
with numpy, in topological order, the graph's initializers being the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import luodi
from luodi.backends import Artifact, CompileOptions, LoadOptions
from luodi.tensor import specs_from_onnx

__version__ = "0.1.0"

SUPPORTED_OPS = (
    "MatMul",
    "Gemm",
    "Add",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Flatten",
    "Reshape",
    "Identity",
)


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803 - ONNX names
    a = a.T if transA else a
    b = b.T if transB else b
    y = np.matmul(a, b)
    if alpha != 1.0:
        y = y * np.asarray(alpha, dtype=y.dtype)
    if c is not None:
        y = y + (c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c)
    return y


def _softmax(x, *, axis=-1, legacy=False):
    if legacy:  # opset < 13: coerce to 2-D at ``axis``, softmax over the flattened tail
        shape = x.shape
        x2 = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
        return _softmax(x2, axis=1).reshape(shape)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _flatten(x, *, axis=1):
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _reshape(x, shape, *, allowzero=0):
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


_KERNELS = {
    "MatMul": np.matmul,
    "Gemm": _gemm,
    "Add": np.add,
    "Relu": lambda x: np.maximum(x, np.zeros((), dtype=x.dtype)),
    "Sigmoid": lambda x: (1.0 / (1.0 + np.exp(-x))).astype(x.dtype, copy=False),
    "Tanh": np.tanh,
    "Softmax": _softmax,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Identity": lambda x: x,
}


def _topological(graph: Any, available: set[str]) -> list[Any]:
    """The graph's nodes in an order where every node comes after the producers of its inputs."""
    pending, ordered, known = list(graph.node), [], set(available) | {""}
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input if i not in known})
            raise luodi.ModelError(f"the graph has a cycle or undefined tensors: {missing[:5]}")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return ordered


class NumpyEngine(luodi.Engine):
    """Runs a pre-parsed list of steps; each run keeps its tensors in a local dict, so it is reentrant."""

    def __init__(self, model: Any) -> None:
        from onnx import helper, numpy_helper

        inputs, outputs = specs_from_onnx(model)
        super().__init__(inputs, outputs)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self._weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self._steps: list[tuple[Any, list[str], list[str], dict[str, Any]]] = []
        for node in _topological(model.graph, set(self._weights) | {i.name for i in inputs}):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Softmax" and opset < 13:
                attrs.setdefault("axis", 1)
                attrs["legacy"] = True
            self._steps.append((_KERNELS[node.op_type], list(node.input), list(node.output), attrs))
        self._out_names = [o.name for o in outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(self._weights)
        env.update(feeds)
        for op, ins, outs, attrs in self._steps:
            result = op(*(env[n] if n else None for n in ins), **attrs)
            env[outs[0]] = result
        return {n: env[n] for n in self._out_names}


class NumpyBackend(luodi.Backend):
    name = "numpy"
    precisions = ("fp32",)
    devices = ("cpu",)
    module = "numpy"

    def compile(self, model: Any, options: CompileOptions) -> Artifact:
        if options.precision not in self.precisions:
            raise luodi.CompileError(
                f"{self.name} has no precision '{options.precision}'; choose one of {list(self.precisions)}"
            )
        for node in model.graph.node:
            if node.op_type not in _KERNELS or node.domain not in ("", "ai.onnx"):
                raise luodi.UnsupportedOpError(
                    f"backend '{self.name}' cannot run operator {node.op_type} at node '{node.name}'; "
                    f"it supports {', '.join(SUPPORTED_OPS)}. Try another target, e.g. onnxruntime"
                )
        return Artifact(self.name, "fp32", {"model.onnx": model.SerializeToString()})

    def load(self, artifact: Artifact, options: LoadOptions) -> luodi.Engine:
        import onnx

        data = artifact.files.get("model.onnx")
        if data is None:
            raise luodi.ModelError(f"{artifact.target} artifact has no model.onnx")
        return NumpyEngine(onnx.load_model_from_string(data))
