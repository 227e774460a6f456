"""What a request carries, read with care: a pipeline's raw input (an upload, bytes, a .npy file) checked before it
is decoded, a JSON infer body of many megabytes, the ``timeout`` parameter; and the OpenAPI description of both
bodies. Used by the routes of luodi.serve.app.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from fastapi import Request

from ..errors import InputError
from .protocol import decode_infer_request

INFER_SCHEMA = {
    "requestBody": {
        "description": "A KServe v2 inference request: JSON, or with the binary-tensor extension the JSON header "
        "(its length in the Inference-Header-Content-Length header) followed by the raw tensor bytes.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "example": "FP32"},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
PREDICT_SCHEMA = {
    "requestBody": {
        "description": "The raw input of the package's pipeline (e.g. an image file): a multipart form field "
        "'file', or the bytes as the body. Query parameter k: how many classes to return.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def raw_input(request: Request, max_pixels: int) -> Any:
    """The bytes of an uploaded file (multipart field 'file') or of the body; a .npy file becomes its array.

    What a header declares is checked before anything is decoded: an image's pixels, a .npy file's bytes."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InputError("the form has no file field 'file'; upload the input as 'file'")
        data, filename = await upload.read(), upload.filename or ""
    else:
        data, filename = await request.body(), ""
    if not data:
        raise InputError("the request carries no input: upload a file as form field 'file' or send its bytes")
    if filename.endswith(".npy") or data[:6] == b"\x93NUMPY":
        return _npy(data)
    _check_image(data, max_pixels)
    return data


def _npy(data: bytes) -> np.ndarray:
    """A .npy file's array, once its header has been checked against the bytes that follow it (a 100-byte file
    may declare 4 TB, and numpy allocates what the header says before reading)."""
    from numpy.lib import format as npy

    f = io.BytesIO(data)
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError) as exc:
        raise InputError(f"the uploaded .npy file could not be read: {str(exc)[:200]}") from None
    if dtype.hasobject:
        raise InputError("the uploaded .npy file holds Python objects; send an array of numbers")
    declared, carried = math.prod(shape) * dtype.itemsize, len(data) - f.tell()
    if declared != carried:
        raise InputError(
            f"the uploaded .npy file declares shape {list(shape)} of {dtype} ({declared} bytes) but carries "
            f"{carried} bytes of data"
        )
    if not declared:
        raise InputError(f"the uploaded .npy array is empty (shape {list(shape)}); send at least one element")
    array = np.frombuffer(data, dtype=dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return array.copy(order="K")  # writable, as np.load's, for pipeline steps that work in place


def _check_image(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header declares no pixels or more than ``max_pixels``, before it is decoded (a
    164 KB PNG declaring 13000x13000 pixels decodes to 0.75 GB). Bytes that are not an image pass untouched:
    the package's pipeline says what it accepts."""
    try:
        import warnings

        from PIL import Image
    except ImportError:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own bound, which `luodi serve` sets to the same limit
        raise InputError(
            f"the image is too large to decode ({exc}); this server decodes at most {max_pixels} pixels "
            "(--max-image-pixels): send a smaller image"
        ) from None
    except Exception:  # not an image (or one Pillow cannot read): the pipeline decides
        return
    if width < 1 or height < 1:
        raise InputError(f"the image has no pixels ({width}x{height}); send an image of at least 1x1")
    if width * height > max_pixels:
        raise InputError(
            f"the image is {width}x{height} = {width * height} pixels; this server decodes at most {max_pixels} "
            "(--max-image-pixels): send a smaller image"
        )


def decode_huge_json(body: bytes) -> Any:
    """Decode a JSON request of many megabytes, then hand the heap its decoder kept back to the system.

    Three 57 MB JSON bodies at once held +160 MB of RSS after their requests were answered (the Python number
    objects' memory stays with the allocator); one at a time and trimmed after, the server returns to its size.
    """
    try:
        return decode_infer_request(body, None)
    finally:
        _trim_heap()


def _trim_heap() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim with
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def timeout_of(param: Any, default: float) -> float:
    """Triton's ``timeout`` request parameter is in microseconds."""
    if param is None:
        return default
    try:
        value = float(param) / 1e6
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"the 'timeout' parameter must be a number of microseconds, got {str(param)[:40]}") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(
            f"the 'timeout' parameter must be a positive, finite number of microseconds, got {str(param)[:40]}"
        )
    return value
