"""The compiler's source: a path to an .onnx file, ``zoo:<name>``, bytes, an ``onnx.ModelProto`` or a SourceModel,
as a checked SourceModel. ``zoo:`` names are resolved here (the zoo builds a SourceModel), the rest is the ONNX
frontend's; a frontend imports no zoo.
"""

from __future__ import annotations

from typing import Any

from ..backends import Artifact, CompileOptions, get_backend
from ..frontends import load_model
from ..source import SourceModel
from ..tensor import TensorSpec, specs_from_onnx


def load_source(src: Any, name: str | None = None) -> SourceModel:
    """``src`` loaded and checked by the frontend, a ``zoo:<name>`` built by the zoo first."""
    if isinstance(src, str) and src.startswith("zoo:"):
        from .. import zoo  # the zoo's loaders import torch and friends: only when a zoo model is asked for

        src = zoo.get(src[4:])
    return load_model(src, name=name)


def compile_in_memory(model: Any, backend: str, precision: str) -> tuple[Artifact, list[TensorSpec], list[TensorSpec]]:
    """A Session on an ONNX model (no package): its artifact for ``backend``, compiled in memory, and its io specs."""
    src = load_source(model)
    artifact = get_backend(backend).compile(src.model, CompileOptions(precision=precision))
    return artifact, *specs_from_onnx(src.model)


__all__ = ["compile_in_memory", "load_source"]
