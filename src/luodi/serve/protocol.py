"""The KServe v2 / Open Inference Protocol over HTTP as pure functions: JSON and binary-tensor bodies <-> numpy.

No web framework and no I/O here, so the HTTP server, a Ray Serve deployment and a client can all share it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ProtocolError

try:  # luodi[serve] installs it; the standard library's json is the fallback and the judge of what orjson refuses
    import orjson
except ImportError:  # pragma: no cover - a server installed without the extra
    orjson = None
from ..tensor import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header of the binary-tensor extension: how many bytes of the body are the JSON part."""

_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}


def datatype_of(dtype: Any) -> str:
    """The protocol's datatype name ("FP32", ...) of a numpy dtype."""
    name = np.dtype(dtype).name
    try:
        return _FROM_NUMPY[name]
    except KeyError:
        raise ProtocolError(f"numpy dtype {name} has no KServe v2 datatype; supported: {sorted(_FROM_NUMPY)}") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype name."""
    try:
        return np.dtype(_TO_NUMPY[datatype])
    except (KeyError, TypeError):
        raise ProtocolError(
            f"datatype {_brief(datatype)} is not supported; use one of {sorted(_TO_NUMPY)} "
            "(BYTES tensors are not served)"
        ) from None


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: its id, input arrays by name, and which outputs to return and how."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_output: bool = False  # the default for outputs not named, from the binary_data_output parameter
    parameters: dict[str, Any] = field(default_factory=dict)


_MAX_DIM = 2**31 - 1  # larger dims overflow engines' int32 shape fields; the body could never fill them anyway
_MAX_RANK = 32  # numpy's limit is 64; no model luodi serves has more than 8


def _json(data: bytes | str, what: str) -> dict[str, Any]:
    """The JSON object of a body. orjson decodes it (a 26 kB request of 3072 numbers: 0.14 ms against json's 0.77);
    what orjson refuses (NaN and Infinity, which JSON lacks and the standard library takes; integers beyond 64
    bits; invalid text) is decoded by the standard library, which also words the error a client gets."""
    if orjson is not None:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            if not isinstance(doc, dict):
                raise ProtocolError(f"the {what} must be a JSON object, got {type(doc).__name__}")
            return doc
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the {what} is not valid JSON ({str(exc)[:200]}); send a KServe v2 JSON object") from None
    except RecursionError:  # [[[[...]]]] nested a few thousand deep: the decoder's recursion limit
        raise ProtocolError(f"the {what} nests JSON arrays or objects too deeply; send a KServe v2 object") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"the {what} must be a JSON object, got {type(doc).__name__}")
    return doc


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in value)
    ):
        raise ProtocolError(
            f"{where}: 'shape' must be a list of at most {_MAX_RANK} integers from 0 to {_MAX_DIM}, got {_brief(value)}"
        )
    return tuple(value)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: 'parameters' must be a JSON object, got {type(value).__name__}")
    return value


def _brief(value: Any, limit: int = 80) -> str:
    """A client's value quoted in an error message, cut short: an error must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def decode_infer_request(body: bytes, header_length: int | str | None = None) -> InferRequest:
    """Decode an infer request body; ``header_length`` is the Inference-Header-Content-Length header, if any.

    With the binary-tensor extension the body is the JSON header followed by each binary input's bytes, in
    the order of the inputs that carry a ``binary_data_size`` parameter.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        doc, blob = _json(body[:n], "request header"), memoryview(body)[n:]
    else:
        doc, blob = _json(body, "request body"), memoryview(b"")
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("the request has no 'inputs' list; give each input's name, shape, datatype and data")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"input #{i} must be an object with a 'name'")
        name = spec["name"]
        where = f"input '{name}'"
        if name in inputs:
            raise ProtocolError(f"{where} is given twice")
        shape = _shape(spec.get("shape"), where)
        dtype = numpy_dtype(spec.get("datatype"))
        count = math.prod(shape)  # a Python int: numpy's int64 product wraps round for [2**32, 2**32]
        size = _parameters(spec.get("parameters"), where).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(blob):
                raise ProtocolError(
                    f"{where}: binary_data_size {_brief(size)} does not fit the {len(blob) - offset} binary bytes left"
                )
            if size != count * dtype.itemsize:
                raise ProtocolError(
                    f"{where}: binary_data_size is {size} bytes but shape {list(shape)} of {spec['datatype']} "
                    f"needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in spec:
                raise ProtocolError(f"{where} has neither 'data' nor a binary_data_size parameter")
            try:
                array = np.asarray(spec["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(
                    f"{where}: 'data' is not a list of {spec['datatype']} values ({str(exc)[:200]})"
                ) from None
            if array.size != count:
                raise ProtocolError(f"{where}: 'data' has {array.size} values but shape {list(shape)} needs {count}")
            array = array.reshape(shape)
        inputs[name] = array
    if offset != len(blob):
        raise ProtocolError(f"the body has {len(blob) - offset} binary bytes that no input's binary_data_size claims")
    params = _parameters(doc.get("parameters"), "the request")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("'outputs' must be a list of {name, parameters} objects")
        default = bool(params.get("binary_data_output", False))
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output must be an object with a 'name'")
            out_params = _parameters(o.get("parameters"), f"output '{o['name']}'")
            outputs.append(RequestedOutput(o["name"], bool(out_params.get("binary_data", default))))
    request_id = doc.get("id")
    return InferRequest(
        inputs=inputs,
        id=None if request_id is None else str(request_id),
        outputs=outputs,
        binary_output=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    request: InferRequest | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length (Inference-Header-Content-Length) when any output is binary."""
    request = request or InferRequest(inputs={})
    wanted = request.outputs or [RequestedOutput(n, request.binary_output) for n in outputs]
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    entries, chunks, finite = [], [], True
    for want in wanted:
        if want.name not in outputs:
            raise ProtocolError(f"the model has no output '{want.name}'; its outputs are {list(outputs)}")
        array = np.asarray(outputs[want.name])
        entry: dict[str, Any] = {"name": want.name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if want.binary:
            data = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            if array.dtype.kind == "f" and finite:
                finite = bool(np.isfinite(array).all())
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc["outputs"] = entries
    header = _dumps(doc, finite)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _dumps(doc: dict[str, Any], finite: bool = True) -> bytes:
    """Compact JSON: orjson's where every number is ``finite`` (it would write NaN and Infinity as null), else the
    standard library's, which writes them as the NaN/Infinity tokens Python's JSON reader takes back."""
    if orjson is not None and finite:
        try:
            return orjson.dumps(doc)
        except (orjson.JSONEncodeError, TypeError):
            pass
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_infer_request(
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[str] | None = None,
    binary_output: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """A client-side infer request body (and the JSON header's length when binary), e.g. for benchmarks."""
    doc: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": binary_output}}
    if request_id is not None:
        doc["id"] = request_id
    chunks = []
    for name, value in inputs.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype)}
        if binary:
            data = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        doc["inputs"].append(entry)
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_output}} for n in outputs]
    header = json.dumps(doc, separators=(",", ":")).encode()
    return (b"".join([header, *chunks]), len(header)) if chunks else (header, None)


def decode_infer_response(body: bytes, header_length: int | str | None = None) -> dict[str, np.ndarray]:
    """The output arrays of a response body (client side)."""
    n = int(header_length) if header_length is not None else len(body)
    doc = _json(body[:n], "response")
    if "error" in doc:
        raise ProtocolError(f"the server answered an error: {doc['error']}")
    result, offset = {}, n
    for o in doc.get("outputs", []):
        dtype, shape = numpy_dtype(o["datatype"]), tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            result[o["name"]] = np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            result[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(shape)
    return result


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A model input/output as the protocol's metadata describes it (-1 for a dimension of any size).

    A quantised integer tensor (an int8-I/O target) adds ``parameters`` with its ``scale`` and ``zero_point``:
    the client sends and reads the integers, float = (q - zero_point) * scale.
    """
    meta: dict[str, Any] = {
        "name": spec.name,
        "datatype": datatype_of(spec.np_dtype),
        "shape": [d if isinstance(d, int) else -1 for d in spec.shape],
    }
    if spec.scale is not None:
        meta["parameters"] = {"scale": spec.scale, "zero_point": spec.zero_point}
    return meta


def model_metadata(name: str, versions: list[str], platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
    """The body of GET /v2/models/{name}[/versions/{v}]."""
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [tensor_metadata(s) for s in inputs],
        "outputs": [tensor_metadata(s) for s in outputs],
    }
