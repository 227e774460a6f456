"""The compiler's source: a path to an .onnx file, ``zoo:<name>``, bytes, an ``onnx.ModelProto`` or a SourceModel,
as a checked SourceModel. ``zoo:`` names are resolved here (the zoo builds a SourceModel), the rest is the ONNX
frontend's; a frontend imports no zoo.
"""

from __future__ import annotations

from typing import Any

from ..frontends import load_model
from ..source import SourceModel


def load_source(src: Any, name: str | None = None) -> SourceModel:
    """``src`` loaded and checked by the frontend, a ``zoo:<name>`` built by the zoo first."""
    if isinstance(src, str) and src.startswith("zoo:"):
        from .. import zoo  # the zoo's loaders import torch and friends: only when a zoo model is asked for

        src = zoo.get(src[4:])
    return load_model(src, name=name)


__all__ = ["load_source"]
