"""Loaders for real pretrained models that ship inside PyPI packages, with their pipelines.

Each loader builds the ONNX graph on the host (torch etc. from the ``luodi[zoo]`` extra); nothing is
downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ModelError
from ..source import SourceModel
from .efficientnet import efficientnet_lite0
from .pipelines import ppocr_v4, silero_vad, yolov8n_nudenet

MODELS: dict[str, Callable[[], SourceModel]] = {
    "efficientnet-lite0": efficientnet_lite0,
    "yolov8n-nudenet": yolov8n_nudenet,
    "pp-ocrv4": ppocr_v4,
    "silero-vad": silero_vad,
}


def names() -> list[str]:
    return sorted(MODELS)


def get(name: str) -> SourceModel:
    """The zoo model called ``name`` (see :func:`names`)."""
    try:
        loader = MODELS[name]
    except KeyError:
        raise ModelError(f"no zoo model named '{name}'; available: {', '.join(names())}") from None
    return loader()


__all__ = ["MODELS", "efficientnet_lite0", "get", "names", "ppocr_v4", "silero_vad", "yolov8n_nudenet"]
