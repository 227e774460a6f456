"""PyTorch frontend: an ``nn.Module`` -> the canonical ONNX graph plus its ``torch.export`` program.

torch is imported inside the functions only. Export failures become ExportError naming the module,
the submodule and the operator; nothing here compiles or runs a target.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import onnx_io
from ..errors import ExportError, MissingExtraError, ModelError
from ..source import SourceModel

#: ONNX opset luodi exports with: the newest one every engine here reads (ncnn's pnnx, MNN, OpenVINO).
OPSET = 17
_UNSUPPORTED = re.compile(r"operator '([\w:.]+)'")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingExtraError("exporting a PyTorch model needs torch: pip install 'luodi[torch]'") from exc
    return torch


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if given is not None:
        names = list(given)
        if len(names) != count:
            raise ExportError(f"{len(names)} {stem} name(s) given for {count} {stem}(s): {names}")
        return names
    return [stem] if count == 1 else [f"{stem}{i}" for i in range(count)]


def _where(module: Any, example: tuple[Any, ...], op: str) -> str:
    """' in submodule 'blocks.3' (MBConvBlock)' for the first node of ``op`` in a trace, or ''."""
    torch = _torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example, check_trace=False)
        for node in traced.inlined_graph.nodes():
            if node.kind() == op and node.scopeName():
                path = node.scopeName().split("/")[-1].replace("__module.", "").removeprefix("__module")
                sub = module.get_submodule(path) if path else module
                return f" in submodule '{path}' ({type(sub).__name__})" if path else ""
    except Exception:  # the trace is only for the message; the export error itself is what matters
        return ""
    return ""


def to_onnx(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = OPSET,
) -> Any:
    """``module`` as an ONNX ModelProto with weights inline (as initializers, in memory).

    A module whose weights pass ``luodi.onnx_io.threshold()`` (2 GB) is exported to a temporary file, where torch
    writes its weights as ONNX external data, and read back whole; the package then keeps them as external data.

    Uses torch.onnx.export's TorchScript exporter (``dynamo=False``): it runs on our zoo models with
    no extra packages, folds BatchNorm in eval mode, and keeps every weight in one ModelProto; the
    dynamo exporter needs onnxscript and writes weights to a separate ``.onnx.data`` file.
    """
    torch = _torch()
    import onnx

    example = _as_tuple(example_inputs)
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = module(*example)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    ins, outs = _names(input_names, len(example), "input"), _names(output_names, n_out, "output")
    axes = {n: {0: "batch"} for n in ins + outs} if dynamic_batch else None
    label = type(module).__name__
    # Over 2 GB an ONNX model cannot be one serialised message: torch then writes the weights as external data,
    # which needs a file to write beside; luodi.onnx_io keeps them external from there on.
    large = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > onnx_io.threshold()
    tmp = tempfile.TemporaryDirectory(prefix="luodi-export-") if large else contextlib.nullcontext(None)
    with tmp as folder:
        target: Any = os.path.join(folder, "model.onnx") if folder else io.BytesIO()
        _export(torch, module, example, target, ins, outs, axes, opset, label)
        if folder:
            from .onnx import _load_file

            model = _load_file(Path(target))
        else:
            model = onnx.load_model_from_string(target.getvalue())
    model.producer_name = "luodi.export"
    model.producer_version = str(torch.__version__)
    return model


def _export(
    torch: Any, module: Any, example: tuple, target: Any, ins: list, outs: list, axes: Any, opset: int, label: str
) -> None:
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),  # torch prints its IR graph on failure
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                target,
                input_names=ins,
                output_names=outs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # torch raises UnsupportedOperatorError, SymbolicValueError, RuntimeError...
        found = _UNSUPPORTED.search(str(exc))
        if found:
            op = found.group(1)
            raise ExportError(
                f"cannot export {label} to ONNX: operator {op}{_where(module, example, op)} is not supported "
                f"at ONNX opset {opset}. Rewrite that part with supported operators, try a newer opset "
                "(opset=...), or register a symbolic with torch.onnx.register_custom_op_symbolic"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot export {label} to ONNX: {type(exc).__name__}: {first}") from exc


def to_program(module: Any, example_inputs: Any, *, dynamic_batch: bool = True) -> bytes:
    """``module`` as a ``torch.export`` program (dynamic batch), saved with ``torch.export.save``."""
    torch = _torch()
    example = _as_tuple(example_inputs)
    if dynamic_batch:
        # torch.export specialises a dimension of size 1, so the example batch must be at least 2
        example = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in example)
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic: Any = tuple({0: batch} for _ in example)
    else:
        dynamic = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic)
    except Exception as exc:  # torch._dynamo / export raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.export cannot capture {type(module).__name__} for the torch backend: {first}. "
            "Leave the torch target out (targets=[...]) or make forward() traceable"
        ) from exc
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    from ..backends import _torch_archive

    try:
        # What luodi writes it must be able to open: a program torch stores with pickles (a tensor subclass as a
        # weight, a custom object) would be refused at every load, so it is refused here, where it can be fixed.
        _torch_archive.check(data, "the torch.export program")
    except ModelError as exc:
        raise ExportError(f"torch.export stored {type(module).__name__} in a form luodi will not load: {exc}") from None
    return data


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    name: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    pipeline: dict[str, Any] | None = None,
    opset: int = OPSET,
    description: str = "",
) -> SourceModel:
    """A SourceModel for ``luodi.compile``: the ONNX graph now, the torch.export program when a torch target asks."""
    model = to_onnx(
        module,
        example_inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        opset=opset,
    )

    def program() -> bytes:
        return to_program(module, example_inputs, dynamic_batch=dynamic_batch)

    return SourceModel(
        model,
        name=name or type(module).__name__,
        pipeline=pipeline,
        description=description,
        torch_program=program,
    )


def build_module(builder: str, weights: str | os.PathLike[str] | None = None) -> Any:
    """``"my_pkg.models:build"`` -> the nn.Module it names or returns, with ``weights`` (a checkpoint) loaded.

    The builder is a module instance, a class or a function taking no arguments. The checkpoint is a
    state dict, or a dict holding one under ``state_dict``/``model``; a DataParallel ``module.`` prefix
    is dropped. The current directory is importable, as for ``python -m``.
    """
    import importlib
    import sys

    torch = _torch()
    mod_name, sep, attr = builder.partition(":")
    if not sep or not mod_name or not attr:
        raise ExportError(f"'{builder}' is not MODULE:NAME, e.g. my_pkg.models:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ExportError(f"cannot import '{mod_name}' for {builder}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"'{mod_name}' has no '{attr}'")
        obj = getattr(obj, part)
    module = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{builder} gave a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors of a bad checkpoint
            raise ExportError(f"cannot read the checkpoint {weights}: {exc}") from exc
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ExportError(f"{weights} holds a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = [], []
        try:
            result = module.load_state_dict(state, strict=False)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        except RuntimeError as exc:  # shape mismatches
            raise ExportError(f"the weights in {weights} do not fit {type(module).__name__}: {exc}") from exc
        if missing or unexpected:
            raise ExportError(
                f"the weights in {weights} do not fit {type(module).__name__}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return module.eval()


__all__ = ["OPSET", "build_module", "from_torch", "to_onnx", "to_program"]
