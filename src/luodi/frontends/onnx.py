"""ONNX frontend: load and validate an ONNX model (file, bytes or ModelProto), infer shapes.

Every failure here is a ModelError that names the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..source import SourceModel


def load_model(src: Any, name: str | None = None) -> SourceModel:
    """Load ``src`` (path to .onnx, bytes, ModelProto or SourceModel) and check it.

    ``zoo:<name>`` is resolved a layer up (luodi.compiler.load_source): a frontend imports no zoo."""
    from ..extras import require

    onnx = require("onnx", "compiling or loading an ONNX model")

    if isinstance(src, SourceModel):
        out = dataclasses.replace(src)  # the caller's object may be compiled again under another name
    elif isinstance(src, str) and src.startswith("zoo:"):
        raise ModelError(f"'{src}' is a zoo name: load it with luodi.compiler.load_source (luodi.compile does)")
    elif isinstance(src, onnx.ModelProto):
        out = SourceModel(src, name or (src.graph.name or "model"))
    elif isinstance(src, bytes):
        out = SourceModel(_parse(src, "<bytes>"), name or "model")
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        if path.suffix == ".luodi":
            raise ModelError(f"{path} is already a luodi package; open it with luodi.Session or `luodi info`")
        out = SourceModel(_load_file(path), name or path.stem)
    else:
        raise ModelError(
            f"cannot compile a {type(src).__name__}; give a path to an .onnx file, "
            "an onnx.ModelProto, or 'zoo:<name>' (see `luodi zoo`)"
        )
    if name:
        out.name = name
    out.model = _check(out.model, out.name)
    out.models = {k: dataclasses.replace(m, model=_check(m.model, f"{out.name}/{k}")) for k, m in out.models.items()}
    return out


def _load_file(path: Path) -> Any:
    """An .onnx file, with its external data (weights in a side file, e.g. ``model.onnx.data``) read in."""
    import onnx

    from .. import onnx_io

    model = _parse(path.read_bytes(), str(path))
    if onnx_io.uses_external(model):  # initializers and tensor attributes alike
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # a missing or short side file
            raise ModelError(f"{path}: its external weight data cannot be read from {path.parent}: {exc}") from exc
    return model


def _parse(data: bytes, where: str) -> Any:
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError
        raise ModelError(f"{where} is not an ONNX model ({exc.__class__.__name__}: {exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{where} is not an ONNX model (it parsed to an empty graph)")
    return model


def _check(model: Any, name: str) -> Any:
    import onnx

    from .. import onnx_io  # models over 2 GB are checked through their graph alone

    try:
        onnx_io.check(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"model '{name}' is not a valid ONNX graph: {first}") from exc
    try:
        return onnx_io.infer_shapes(model, check_type=True)
    except Exception as exc:  # shape inference errors are InferenceError in recent onnx
        raise ModelError(f"model '{name}' fails ONNX shape inference: {exc}") from exc
