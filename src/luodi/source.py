"""SourceModel: what a frontend hands the compiler (a canonical float graph plus what travels with it into a package).

A low module: the frontends make SourceModels, the zoo builds them, the compiler consumes them; none of them has to
import another for the type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceModel:
    """A canonical float graph plus what travels with it into a package."""

    model: Any  # onnx.ModelProto
    name: str
    pipeline: dict[str, Any] | None = None
    version: str = "1"
    description: str = ""
    samples: list[Any] = field(default_factory=list)
    """Raw inputs (e.g. image paths) that the pipeline turns into realistic verification inputs."""
    torch_program: bytes | Callable[[], bytes] | None = None
    """A ``torch.export`` program saved with ``torch.export.save`` (or a function making it on demand),
    when the model came from PyTorch."""
    int8_ranges: dict[str, tuple[float, float]] | None = None
    """Activation ranges by tensor name from quantisation-aware training (luodi.quant.qat): the int8 targets take
    them instead of calibrating, and keep the weights' trained rounding."""
    models: dict[str, SourceModel] = field(default_factory=dict)
    """Further models of a multi-model pipeline (e.g. OCR's "cls" and "rec"), by the name the pipeline's
    graph calls them; this model is "main". Each is compiled for the same targets and verified alike."""
