"""Loaders for real pretrained models that ship inside PyPI packages, with their pipelines.

Each loader builds the ONNX graph on the host (torch etc. from the ``luodi[zoo]`` extra); nothing is
downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ModelError
from ..frontends import SourceModel
from .efficientnet import efficientnet_lite0

MODELS: dict[str, Callable[[], SourceModel]] = {
    "efficientnet-lite0": efficientnet_lite0,
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


__all__ = ["MODELS", "efficientnet_lite0", "get", "names"]
