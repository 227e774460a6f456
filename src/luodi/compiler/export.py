"""luodi.export: a PyTorch module straight to a verified package (the torch frontend, then luodi.compile).

In the compiler layer because it compiles: the frontend (luodi.frontends.torch) only turns the module into a graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..frontends.torch import OPSET, from_torch
from .build import compile as compile_package


def export(
    module: Any,
    example_inputs: Any,
    out: str | os.PathLike[str],
    targets: Sequence[str] = ("onnxruntime", "torch"),
    *,
    name: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    pipeline: dict[str, Any] | None = None,
    opset: int = OPSET,
    log: Callable[[str], None] | None = None,
    **compile_options: Any,
) -> Any:
    """PyTorch module -> ONNX -> graph passes -> every target -> verified .luodi package, in one call.

    ``example_inputs`` is a tensor or a tuple of tensors of the shapes the model takes (the batch axis
    stays dynamic unless ``dynamic_batch=False``). ``pipeline`` is a pre/post-processing spec stored in
    the package. The package keeps the module's ``torch.export`` program for the ``torch`` target.
    Other keyword arguments go to :func:`luodi.compile` (``passes``, ``accuracy_budget``, ``strict``...).
    """
    src = from_torch(
        module,
        example_inputs,
        name=name,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        pipeline=pipeline,
        opset=opset,
    )
    return compile_package(src, out, targets, log=log, **compile_options)


__all__ = ["export"]
