"""The wire between a parent and its worker process: JSON headers with raw bytes over a socket, tensors in memfds.

Nothing here is pickled, and a reader checks every size, offset and dtype its peer names before it reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import mmap
import os
import socket
import struct
from typing import Any

import numpy as np

_PREFIX = struct.Struct("<IQ")  # JSON header length, raw payload length
_MAX_HEADER = 1 << 20  # a control message is small; a bigger one is a broken or hostile peer
_MAX_REGION = 1 << 36  # 64 GiB: a child that asks more is lying
_ALIGN = 64
_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
)


Arrays = dict[str, np.ndarray]


class Gone(Exception):
    """The peer closed its end of the socket (it exited or was killed) or broke the protocol."""


class Hung(Gone):
    """The peer did not answer within the call's timeout."""


# -- framing: a prefix, a JSON header, raw bytes -------------------------------------------------------------------
def send(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_PREFIX.pack(len(head), len(payload)) + head)
    if len(payload):
        sock.sendall(payload)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise Gone("the peer closed the connection")
        got += k
    return buf


def recv(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytearray]:
    try:
        hlen, plen = _PREFIX.unpack(recv_exact(sock, _PREFIX.size))
        if hlen > _MAX_HEADER or plen > max_payload:
            raise Gone(f"a message of {hlen} + {plen} bytes is over the protocol's limits")
        header = json.loads(recv_exact(sock, hlen))
        payload = recv_exact(sock, plen) if plen else bytearray()
    except TimeoutError:
        raise Hung(f"no answer within {sock.gettimeout():g} s") from None
    except (OSError, ValueError) as exc:
        raise Gone(f"the connection broke ({exc})") from exc
    if not isinstance(header, dict):
        raise Gone("a control message is not a JSON object")
    return header, payload


# -- shared memory ---------------------------------------------------------------------------------------------------
class Region:
    """A memfd both processes map; the writer grows it (never shrinks: the parent seals it) and names its size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None

    @classmethod
    def create(cls, name: str) -> Region:
        if not hasattr(os, "memfd_create"):
            from ..errors import BackendUnavailableError

            raise BackendUnavailableError(
                "running an engine in a worker process needs Linux memory files (memfd) for the tensors; "
                "this platform has none: run the model in-process (no isolate)"
            )
        fd = os.memfd_create(f"luodi-worker-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # A child that shrank the file under the parent's mapping would kill the parent with SIGBUS on its next read.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return cls(fd)

    def grow(self, nbytes: int) -> None:
        """Make room for ``nbytes`` (as the writer): extend the file by half again, then map it."""
        if nbytes > self.size:
            want = max(nbytes + nbytes // 2, 1 << 16)
            if os.fstat(self.fd).st_size < want:
                os.ftruncate(self.fd, want)
            self._map(want)

    def view(self, nbytes: int) -> mmap.mmap:
        """The mapping, covering at least ``nbytes`` (as the reader, after the writer said it wrote that much)."""
        if nbytes > self.size:
            real = os.fstat(self.fd).st_size
            if nbytes > real or nbytes > _MAX_REGION:
                raise Gone(f"the peer named {nbytes} bytes of shared memory, but there are {real}")
            self._map(real if real <= _MAX_REGION else nbytes)  # a lying peer gets no huge map
        assert self.map is not None
        return self.map

    def _map(self, size: int) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):  # an engine still holds a view: the old map goes with it
                self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):
                self.map.close()
            self.map = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


def write_arrays(region: Region, arrays: Arrays) -> list[dict[str, Any]]:
    """Lay ``arrays`` out in ``region`` (64-byte aligned) and return their descriptions for the header."""
    described: list[dict[str, Any]] = []
    if not arrays:
        return described
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.str not in _DTYPES:
            raise TypeError(f"tensor '{name}' has dtype {a.dtype}, which a worker process cannot carry")
        described.append({"name": str(name), "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    region.grow(offset)
    assert region.map is not None
    for d, a in zip(described, arrays.values()):
        a = np.asarray(a)
        np.frombuffer(region.map, a.dtype, a.size, d["offset"]).reshape(a.shape)[...] = a
    return described


def read_arrays(region: Region, described: Any, copy: bool) -> Arrays:
    """The arrays ``described`` names in ``region``; every field checked, since the peer may be broken."""
    if not isinstance(described, list):
        raise Gone("the tensor list is not a list")
    out: Arrays = {}
    for d in described:
        try:
            name, dtype, shape, offset = str(d["name"]), np.dtype(d["dtype"]), list(d["shape"]), int(d["offset"])
            if dtype.str not in _DTYPES or not all(isinstance(n, int) and n >= 0 for n in shape) or offset < 0:
                raise ValueError(f"{dtype} {shape} at {offset}")
        except (KeyError, TypeError, ValueError) as exc:
            raise Gone(f"a malformed tensor description: {exc}") from exc
        count = math.prod(shape)
        mem = region.view(offset + count * dtype.itemsize)
        a = np.frombuffer(mem, dtype, count, offset).reshape(shape)
        out[name] = a.copy() if copy else a
    return out
