"""Arrays in .npy/.npz files: read without pickle, written whole, summarised.

The one reader of the array files users hand to luodi (``luodi run --input``, ``compile --sample``, calibration and
verification data) and the writer of ``luodi run -o``. It never unpickles (an object array in an .npy runs code
when it is loaded), never writes outside the folder it is given and never leaves a half-written file; a file it
cannot read is an InputError naming the file and, in ``what``, where it was given. It knows no models or inputs.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ZIP_ERRORS, InputError


def load(path: str | os.PathLike[str], what: str) -> np.ndarray | dict[str, np.ndarray]:
    """An .npy file's array, or an .npz file's arrays by name (every member read now: a damaged one fails here)."""
    given = os.fspath(path)
    if not Path(given).is_file():
        raise InputError(f"{what}: no file {given}")
    try:
        data = np.load(given, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return data
        with data:
            arrays = {name: data[name] for name in data.files}
    except ZIP_ERRORS as exc:
        kind = "an .npz" if given.endswith(".npz") else "an .npy"
        why = "it holds Python objects, which luodi never unpickles" if "pickle" in str(exc) else str(exc)
        raise InputError(f"{what}: {given} is not {kind} file of plain arrays ({why})") from None
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):  # numpy hands back a member that is not an .npy as its raw bytes
            raise InputError(f"{what}: {given}: '{name}' is not an array (numpy.savez(f, {name}=array) writes one)")
    return arrays


def load_npy(path: str | os.PathLike[str], what: str) -> np.ndarray:
    """The one array of an .npy file."""
    data = load(path, what)
    if isinstance(data, dict):
        raise InputError(f"{what}: {os.fspath(path)} holds several arrays (an .npz), not one array")
    return data


def load_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name (``numpy.savez(f, x=...)``)."""
    data = load(path, what)
    if not isinstance(data, dict):
        raise InputError(
            f"{what}: {os.fspath(path)} holds a single array; save one array per name: numpy.savez(f, x=...)"
        )
    return data


def save(arrays: Mapping[str, Any], folder: str | os.PathLike[str]) -> dict[str, str]:
    """Each array as ``folder/NAME.npy``, written whole or not at all; returns name -> file written.

    NAME is made safe for a file name (a tensor name such as ``../evil`` or ``a/b`` is never a path), and names
    that differ only in case get distinct files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    taken: set[str] = set()
    for name, array in arrays.items():
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "output"  # never a path: no '/', no '..'
        base, n = stem, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        dest = folder / f"{stem}.npy"
        tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # created fresh ('x'), mode per umask
        try:
            with open(tmp, "xb") as fh:
                np.save(fh, np.asarray(array), allow_pickle=False)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written[name] = str(dest)
    return written


def summary(a: Any) -> dict[str, Any]:
    """Shape, dtype, and min/max/mean over the finite values (None when there are none); ``nonfinite`` counts
    the NaN/Inf left out."""
    a = np.asarray(a)
    row: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "min": None, "max": None, "mean": None}
    numeric = a.dtype.kind in "biuf"
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a.ravel() if numeric else a.ravel()[:0]
    row["nonfinite"] = int(a.size - finite.size) if a.dtype.kind == "f" else 0
    if numeric and finite.size:
        row.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean(dtype=np.float64)))
    return row
