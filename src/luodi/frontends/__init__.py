"""Frontends: turn what the user has (an ONNX file, a ModelProto, a zoo model) into one canonical graph.

They validate and normalise the graph; they never run it.
"""

from .onnx import SourceModel, load_model

__all__ = ["SourceModel", "load_model"]
