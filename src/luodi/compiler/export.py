"""luodi.export: a PyTorch module straight to a verified package (the torch frontend, then luodi.compile).

In the compiler layer because it compiles: the frontend (luodi.frontends.torch) only turns the module into a graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..frontends.torch import OPSET, from_torch, to_program
from ..source import SourceModel
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
    qat: Any = None,
    **compile_options: Any,
) -> Any:
    """PyTorch module -> ONNX -> graph passes -> every target -> verified .luodi package, in one call.

    ``example_inputs`` is a tensor or a tuple of tensors of the shapes the model takes (the batch axis
    stays dynamic unless ``dynamic_batch=False``). ``pipeline`` is a pre/post-processing spec stored in
    the package. The package keeps the module's ``torch.export`` program for the ``torch`` target.
    Other keyword arguments go to :func:`luodi.compile` (``passes``, ``accuracy_budget``, ``strict``...).

    ``qat`` (a :class:`luodi.quant.qat.QATConfig`) fine-tunes a copy of the module with fake-quant nodes following
    ``qat.target``'s int8 policy first (quantisation-aware training, see luodi.quant.qat): the package holds the
    fine-tuned model, and its int8 targets take the trained activation ranges and weight rounding instead of
    calibrating. Without ``calibration=``, the first samples of ``qat.data`` calibrate the tensors QAT did not see.
    """
    if qat is not None:
        return _export_trained(
            module, example_inputs, out, targets, qat, name, input_names, output_names, dynamic_batch, pipeline,
            opset, log, compile_options,
        )  # fmt: skip
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


def _export_trained(
    module: Any,
    example_inputs: Any,
    out: Any,
    targets: Sequence[str],
    config: Any,
    name: str | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_batch: bool,
    pipeline: dict[str, Any] | None,
    opset: int,
    log: Callable[[str], None] | None,
    compile_options: dict[str, Any],
) -> Any:
    from ..errors import InputError
    from ..quant.qat import QATConfig, qat

    if not isinstance(config, QATConfig):
        raise InputError(f"qat= takes a luodi.quant.qat.QATConfig, not {type(config).__name__}")
    trained = qat(
        module,
        example_inputs,
        config,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        opset=opset,
        log=log,
    )

    def program() -> bytes:
        return to_program(trained.module, example_inputs, dynamic_batch=dynamic_batch)

    trained.model.producer_name = "luodi.export"
    src = SourceModel(
        trained.model,
        name=name or type(module).__name__,
        pipeline=pipeline,
        torch_program=program,
        int8_ranges=trained.ranges,
    )
    compile_options.setdefault("calibration", trained.inputs)
    return compile_package(src, out, targets, log=log, **compile_options)


__all__ = ["export"]
