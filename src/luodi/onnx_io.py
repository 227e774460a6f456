"""ONNX graphs of any size: weights over protobuf's 2 GB limit travel as ONNX external data.

A protobuf message cannot be serialised past 2 GB, so a model whose weights are larger cannot be written as one
``model.onnx``, nor given to ``onnx.checker`` / ``onnx.shape_inference`` / an engine as bytes. In memory such a
model is still one ``onnx.ModelProto`` (luodi keeps weights as graph initializers, never inside engine objects);
at every boundary where it would be serialised, this module splits it the way ONNX specifies:

- the graph, with each large tensor's ``raw_data`` replaced by an ``external_data`` reference
  (``location``/``offset``/``length``), as ``model.onnx``;
- the tensors' bytes, back to back (64-byte aligned), as ``model.onnx.data``.

:func:`to_members` does it for a package (both become package members, read back by :func:`from_members`),
:func:`save` for an engine converter that reads a file, and :func:`infer_shapes` / :func:`check` run ONNX's own
tools on the small graph only. Models under the limit are untouched: one ``model.onnx``, as before.

The limit is ``LIMIT`` (2 GB less a margin for the graph itself); ``LUODI_EXTERNAL_DATA_ABOVE`` (bytes) lowers
it, e.g. to keep the weights of a mid-sized model beside its graph too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import LuodiError, ModelError

LIMIT = (2 << 30) - (64 << 20)
"""Weights above this many bytes go to external data (protobuf refuses messages over 2 GB)."""

MIN_EXTERNAL = 1024
"""Tensors smaller than this stay inside the graph (shapes, small constants), as onnx's own converter does."""

_ALIGN = 64

_PACKED = {21, 22, 23, 8}
"""INT4, UINT4, FLOAT4E2M1 (two elements a byte) and STRING: their byte size is not dims x item size, so they stay
inside the graph."""


def threshold() -> int:
    raw = os.environ.get("LUODI_EXTERNAL_DATA_ABOVE")
    if raw is None:
        return LIMIT
    try:
        return max(0, min(int(raw), LIMIT))
    except ValueError:
        raise ModelError(
            f"LUODI_EXTERNAL_DATA_ABOVE={raw!r} is not a number of bytes; unset it or give e.g. 1000000"
        ) from None


def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def weights_size(model: Any) -> int:
    """Bytes of tensor data the model holds inline (what would overflow a serialised message).

    Computed from each tensor's dims and element type: ``len(t.raw_data)`` would copy the bytes out of the
    protobuf and ``t.ByteSize()`` encodes the message, each costing a pass over gigabytes for a large model.
    """
    return sum(_nbytes(t) for t in _tensors(model) if t.HasField("raw_data"))


def _nbytes(t: Any) -> int:
    from onnx import helper

    n = 1
    for d in t.dims:
        n *= d
    try:
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # an element type numpy has no dtype for: count a byte per element
        return n


def is_large(model: Any) -> bool:
    """Whether ``model`` must be split into graph + external data to be serialised (see :func:`threshold`)."""
    return weights_size(model) > threshold()


def _shell(model: Any, location: str) -> tuple[Any, list[tuple[Any, int]]]:
    """A copy of ``model`` whose large top-level initializers are external references into ``location``, and the
    (tensor, offset) of each moved tensor in that data file.

    Built field by field, so that neither ``model`` nor its weights are touched: with upb protobuf every
    assignment to ``raw_data`` allocates in the message's arena until the whole model is freed, so moving the
    bytes out and back would leave a copy of the weights behind each time.
    """
    import onnx

    shell = onnx.ModelProto()
    graph = model.graph
    kept = [t for t in graph.initializer]
    shell_graph = onnx.GraphProto()
    _copy_fields(graph, shell_graph, skip={"initializer"})
    moved, offset = [], 0
    for t in kept:
        if not t.HasField("raw_data") or t.data_type in _PACKED or _nbytes(t) < MIN_EXTERNAL:
            shell_graph.initializer.append(t)
            continue
        offset += -offset % _ALIGN
        ref = shell_graph.initializer.add()
        ref.name, ref.data_type = t.name, t.data_type
        if t.doc_string:
            ref.doc_string = t.doc_string
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(_nbytes(t)))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        moved.append((t, offset))
        offset += _nbytes(t)
    _copy_fields(model, shell, skip={"graph"})
    shell.graph.CopyFrom(shell_graph)
    return shell, moved


def _copy_fields(src: Any, dst: Any, skip: set[str]) -> None:
    """Every field of protobuf message ``src`` but ``skip`` into ``dst`` (whatever this onnx version defines)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _write_data(moved: list[tuple[Any, int]], fh: Any) -> None:
    """The data file: each moved tensor's bytes at its offset (zeros in the alignment gaps)."""
    pos = 0
    for t, offset in moved:
        fh.write(b"\0" * (offset - pos))
        data = _raw(t)  # one tensor's bytes at a time
        fh.write(data)
        pos = offset + len(data)


def _raw(t: Any) -> bytes:
    data = t.raw_data
    if len(data) != _nbytes(t):  # the offsets were laid out from dims x element size
        raise ModelError(
            f"tensor '{t.name}' holds {len(data)} bytes of raw data where its shape {list(t.dims)} needs "
            f"{_nbytes(t)}; the model is malformed"
        )
    return data


def split(model: Any, location: str = "model.onnx.data") -> tuple[bytes, bytes]:
    """``model`` as (graph bytes with external references to ``location``, the data file's bytes).

    The data is a ``bytearray`` filled in place (a ``bytes`` built from parts would hold the weights twice).
    """
    shell, moved = _shell(model, location)
    data = bytearray(max((offset + _nbytes(t) for t, offset in moved), default=0))
    for t, offset in moved:
        raw = _raw(t)  # one tensor's bytes at a time
        data[offset : offset + len(raw)] = raw
        del raw
    return shell.SerializeToString(), data  # type: ignore[return-value]  # bytes-like; zip and hashlib take it


def to_members(model: Any, member: str = "model.onnx") -> dict[str, bytes]:
    """The package members holding ``model``: ``{member: bytes}``, plus ``member + ".data"`` when it is large."""
    if not is_large(model):
        return {member: model.SerializeToString()}
    data_member = member + ".data"
    graph, data = split(model, location=Path(data_member).name)
    return {member: graph, data_member: data}


def uses_external(model: Any) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in _tensors(model))


def refuse_external(model: Any, where: str = "the model") -> None:
    """Raise ModelError when a tensor of ``model`` still points at external data.

    A model handed to the compiler has its weights inside it (luodi's frontends read a file's external data from
    that file's own folder). A reference left unresolved would be read by an engine relative to the process's
    working directory (OpenVINO's ONNX reader does so for a model given as bytes): a plain ``secret.txt`` there
    would become a weight, and its bytes an output.
    """
    from onnx import TensorProto

    for t in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            raise ModelError(
                f"{where}: tensor '{t.name}' keeps its data in an external file {loc!r} that was not read in; "
                "give the model as a path to its .onnx file (its external data is read from that file's folder), "
                "or load it with onnx.load(path) first"
            )


#: What onnxruntime says when it refuses external data that :func:`sealed_ort_options` kept out.
EXTERNAL_REFUSED = re.compile(r"External data path|External file: .* not found|model_path must not be empty")
_NO_FOLDER = os.devnull
"""Where onnxruntime is told a model's external files lie: a file, never a folder, so no path under it exists."""


def sealed_ort_options(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make`` (a SessionOptions factory) whose sessions read no external data from disk.

    onnxruntime resolves a model-from-bytes' external data against the working directory; pointed at a folder
    that cannot exist, every location not handed over in memory fails to load instead.
    """

    def options() -> Any:
        so = make()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", _NO_FOLDER)
        return so

    return options


def attach(model: Any, read: Callable[[str], bytes | memoryview]) -> Any:
    """Fill ``model``'s external tensors in place from ``read(location)`` (a package member, a dict...); return it.

    A location that names a parent folder or an absolute path, or a slice past the end of its data, is a ModelError:
    the bytes of a package never come from outside it.
    """
    from onnx import TensorProto

    blobs: dict[str, Any] = {}
    for t in _tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise ModelError(f"tensor '{t.name}' has external data at {loc!r}; only a file beside the graph is allowed")
        if loc not in blobs:
            try:
                blobs[loc] = memoryview(read(loc))
            except LuodiError as exc:  # the package (or artifact) has no such member: never look elsewhere
                raise ModelError(
                    f"tensor '{t.name}' has external data at {loc!r}, which is not in the package ({exc})"
                ) from None
        blob = blobs[loc]
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else len(blob) - offset
        except ValueError:
            raise ModelError(f"tensor '{t.name}' has a malformed external_data entry {info}") from None
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise ModelError(
                f"tensor '{t.name}' wants bytes {offset}..{offset + length} of {loc}, which has {len(blob)}; "
                "the weights file is truncated or does not belong to this graph"
            )
        t.raw_data = bytes(blob[offset : offset + length])
        del t.external_data[:]
        t.ClearField("data_location")  # DEFAULT: the tensor as it was before it was split off
    return model


def from_members(graph: bytes, read: Callable[[str], bytes | memoryview], where: str = "model.onnx") -> Any:
    """The ModelProto stored by :func:`to_members`: ``read(location)`` gives the bytes of its data file(s)."""
    import onnx

    try:
        model = onnx.load_model_from_string(graph)
    except Exception as exc:  # protobuf DecodeError
        raise ModelError(f"{where} is not a valid ONNX model ({exc})") from exc
    return attach(model, read)


def save(model: Any, path: str | os.PathLike[str]) -> list[Path]:
    """Write ``model`` to ``path``, and its weights to ``path.data`` when it is large; return the files written."""
    path = Path(path)
    if not is_large(model):
        path.write_bytes(model.SerializeToString())
        return [path]
    data = path.with_name(path.name + ".data")
    shell, moved = _shell(model, data.name)
    path.write_bytes(shell.SerializeToString())
    with open(data, "wb") as fh:  # streamed tensor by tensor: no second copy of the weights in memory
        _write_data(moved, fh)
    return [path, data]


def infer_shapes(model: Any, **kwargs: Any) -> Any:
    """``onnx.shape_inference.infer_shapes`` for a model of any size (shapes come from the small graph alone).

    Under the limit it returns ONNX's inferred copy. Over it, copying gigabytes of weights only to add shape
    annotations would double the memory, so the inferred ``value_info`` and output types are written into
    ``model`` itself, which is returned.
    """
    import onnx

    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    inferred = onnx.shape_inference.infer_shapes(_shell(model, "model.onnx.data")[0], **kwargs)
    for field in ("value_info", "output"):
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(inferred.graph, field))
    return model


def check(model: Any) -> None:
    """``onnx.checker.check_model`` for a model of any size.

    Over the limit the checker reads the small graph from a temporary folder, beside a sparse stand-in for its
    data file (the checker only asks that the file exists; no weight byte is written).
    """
    import tempfile

    import onnx

    refuse_external(model)  # the gate every model passes on its way into the compiler
    if not is_large(model):
        onnx.checker.check_model(model)
        return
    shell, moved = _shell(model, "model.onnx.data")
    with tempfile.TemporaryDirectory(prefix="luodi-check-") as tmp:
        graph = Path(tmp) / "model.onnx"
        graph.write_bytes(shell.SerializeToString())
        with open(Path(tmp) / "model.onnx.data", "wb") as fh:
            fh.truncate(max((offset + _nbytes(t) for t, offset in moved), default=0))
        onnx.checker.check_model(str(graph))
