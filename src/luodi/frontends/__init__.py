"""Frontends: turn what the user has (an ONNX file, bytes, a ModelProto, a torch module) into one canonical graph.

They validate and normalise the graph; they never run it, and import neither the zoo nor the compiler
(``zoo:`` names and ``luodi.export`` are the compiler's: luodi.compiler.load_source, luodi.compiler.export).
"""

from .onnx import SourceModel, load_model

__all__ = ["SourceModel", "load_model"]
