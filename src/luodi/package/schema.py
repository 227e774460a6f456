"""What a sound manifest.json holds: types, member names, shapes and sizes, checked before anything uses a value.

A hostile or damaged manifest becomes one PackageError naming the field; nothing here reads a member or allocates
by a size the manifest declares.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ..errors import PackageError

FOLDED_NORMALIZATION = "folded_into_model"
"""The key of the manifest's pipeline that records a normalisation folded into the graph's first Conv:
``{"input": name, "mean": [...], "std": [...]}`` (written by the compiler's fold-input-normalization pass)."""

# Limits on what a manifest may declare. A member or tensor beyond them is refused before anything is allocated.
MAX_MANIFEST_BYTES = 16 << 20
MAX_MEMBER_BYTES = 16 << 30
MAX_TENSOR_BYTES = 1 << 30
MAX_DIM = (1 << 31) - 1
MAX_RANK = 32
MAX_ENTRIES = 4096
DTYPES = {"float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "int64", "uint32", "uint64"}
DTYPES.add("bool")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"^[A-Za-z]:")
_COMPARISON = {"max_abs", "mean_abs", "cosine", "ref_max"}
_STATUS = {"verified", "unverified", "failed"}


class _Bad(Exception):
    """A field that is not what it must be; check_manifest turns it into a PackageError."""


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise _Bad(f"{where} {what}")


def _dict(value: Any, where: str) -> dict[str, Any]:
    _require(isinstance(value, dict), where, f"must be an object, not {type(value).__name__}")
    _require(len(value) <= MAX_ENTRIES, where, f"has {len(value)} entries, more than {MAX_ENTRIES}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    _require(isinstance(value, list), where, f"must be a list, not {type(value).__name__}")
    _require(len(value) <= MAX_ENTRIES, where, f"has {len(value)} entries, more than {MAX_ENTRIES}")
    return value


def _str(value: Any, where: str, limit: int = 1024) -> str:
    _require(
        isinstance(value, str) and 0 < len(value) <= limit, where, f"must be a non-empty string, not {value!r:.80}"
    )
    return value


def _number(value: Any, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    _require(ok, where, f"must be a number, not {value!r:.80}")
    return float(value)


def member_name(name: Any, where: str) -> str:
    """A zip member name that cannot point outside the package: relative, no '..', no backslash or NUL."""
    _str(name, where, 512)
    parts = name.split("/")
    unsafe = name.startswith("/") or "\\" in name or "\0" in name or _DRIVE.match(name) or ".." in parts
    _require(not unsafe and "" not in parts, where, f"'{name[:80]}' is not a safe member name (absolute or '..')")
    return name


def _shape(value: Any, dtype: str, where: str) -> None:
    dims = _list(value, where)
    _require(len(dims) <= MAX_RANK, where, f"has rank {len(dims)}, more than {MAX_RANK}")
    elements = 1
    for i, d in enumerate(dims):
        if d is None or isinstance(d, str):
            _require(d is None or len(d) <= 4096, f"{where}[{i}]", "is a symbolic dimension name over 4096 characters")
            continue
        ok = isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
        _require(ok, f"{where}[{i}]", f"must be a size 0..{MAX_DIM}, a name or null, not {d!r:.80}")
        elements *= d
    nbytes = elements * np.dtype(dtype).itemsize
    _require(nbytes <= MAX_TENSOR_BYTES, where, f"{dims} declares {nbytes} bytes, over the {MAX_TENSOR_BYTES} limit")


def _specs(value: Any, where: str) -> None:
    names = set()
    for i, spec in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        spec = _dict(spec, at)
        name = _str(spec.get("name"), f"{at}.name")
        _require(name not in names, at, f"repeats the name '{name[:80]}'")
        names.add(name)
        dtype = spec.get("dtype")
        _require(
            isinstance(dtype, str) and dtype in DTYPES,
            f"{at}.dtype",
            f"must be one of {sorted(DTYPES)}, not {dtype!r:.80}",
        )
        _shape(spec.get("shape"), dtype, f"{at}.shape")
        if spec.get("scale") is not None:
            _number(spec["scale"], f"{at}.scale")
        zp = spec.get("zero_point")
        _require(zp is None or (isinstance(zp, int) and not isinstance(zp, bool)), f"{at}.zero_point", "must be an int")


def _targets(value: Any, files: dict[str, Any], where: str) -> None:
    for i, target in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        target = _dict(target, at)
        _str(target.get("backend"), f"{at}.backend", 128)
        _str(target.get("precision"), f"{at}.precision", 64)
        for rel, member in _dict(target.get("files"), f"{at}.files").items():
            member_name(rel, f"{at}.files key")
            member_name(member, f"{at}.files['{rel}']")
            _require(member in files, f"{at}.files['{rel}']", f"names '{member}', which the manifest does not pin")
        _dict(target.get("options", {}), f"{at}.options")  # each backend reads its own options
        if "status" in target:
            ok = isinstance(target["status"], str) and target["status"] in _STATUS
            _require(ok, f"{at}.status", f"must be one of {sorted(_STATUS)}")
        if "reason" in target:
            _str(target["reason"], f"{at}.reason", 4096)
        ver = target.get("verification")
        if ver is not None:
            ver = _dict(ver, f"{at}.verification")
            _require(isinstance(ver.get("passed", False), bool), f"{at}.verification.passed", "must be true or false")
            for name, r in _dict(ver.get("outputs", {}), f"{at}.verification.outputs").items():
                at_out = f"{at}.verification.outputs['{name}']"
                r = _dict(r, at_out)
                extra = set(r) - _COMPARISON
                _require(
                    set(r) >= _COMPARISON and extra <= {"mismatch", "exact"}, at_out, f"must have {sorted(_COMPARISON)}"
                )
                for k in _COMPARISON:
                    if r[k] is None:  # null only where a mismatch (a shape, NaN) made the number meaningless
                        _require("mismatch" in r, f"{at_out}.{k}", "may be null only beside a 'mismatch'")
                    else:
                        _number(r[k], f"{at_out}.{k}")
                if "mismatch" in r:
                    _str(r["mismatch"], f"{at_out}.mismatch", 4096)
                _require(isinstance(r.get("exact", False), bool), f"{at_out}.exact", "must be true or false")
        if "io" in target:  # a target whose boundary differs from the model's: int8 I/O (same names, integer dtypes)
            io = _dict(target["io"], f"{at}.io")
            for side in ("inputs", "outputs"):
                _specs(io.get(side), f"{at}.io.{side}")
                for k, spec in enumerate(io[side]):
                    if np.dtype(spec["dtype"]).kind in "iu" and spec.get("scale") is not None:
                        _require(spec["scale"] > 0, f"{at}.io.{side}[{k}].scale", "must be positive")
                        _require(spec.get("zero_point") is not None, f"{at}.io.{side}[{k}].zero_point", "is missing")
                        info = np.iinfo(np.dtype(spec["dtype"]))
                        ok = info.min <= spec["zero_point"] <= info.max
                        _require(ok, f"{at}.io.{side}[{k}].zero_point", f"is outside {spec['dtype']}")
        if "estimate" in target:  # a device this host only estimates (Vela on litert:int8): figures by configuration
            for config, e in _dict(target["estimate"], f"{at}.estimate").items():
                _str(config, f"{at}.estimate key", 64)
                e = _dict(e, f"{at}.estimate['{config}']")
                for k in ("inference_ms", "cycles", "sram_kib", "flash_kib", "npu_ops", "cpu_ops"):
                    if k in e:
                        _number(e[k], f"{at}.estimate['{config}'].{k}")
        if "timing" in target:
            timing = _dict(target["timing"], f"{at}.timing")
            _number(timing.get("median_ms"), f"{at}.timing.median_ms")


def _shape_sets(value: Any, where: str) -> None:
    """``shapes``: {"representative": [{input: [sizes]}, ...], "ranges": {input: {axis: [low, high]}},
    "domains": {input: {"kind", "low", "high"}}}; every size concrete."""
    value = _dict(value, where)
    sets = _list(value.get("representative", []), f"{where}.representative")
    for i, shapes in enumerate(sets):
        for name, shape in _dict(shapes, f"{where}.representative[{i}]").items():
            at = f"{where}.representative[{i}]['{name}']"
            _shape(shape, "float64", at)
            _require(all(isinstance(d, int) for d in shape), at, "must hold sizes only")
    for name, axes in _dict(value.get("ranges", {}), f"{where}.ranges").items():
        for axis, bounds in _dict(axes, f"{where}.ranges['{name}']").items():
            at = f"{where}.ranges['{name}']['{axis}']"
            _require(isinstance(axis, str) and axis.isdigit() and int(axis) < MAX_RANK, at, "must be an axis number")
            ok = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)
            _require(ok and 0 <= bounds[0] <= bounds[1] <= MAX_DIM, at, "must be [low, high] sizes")
    for i, note in enumerate(_list(value.get("notes", []), f"{where}.notes")):
        _str(note, f"{where}.notes[{i}]", 4096)
    for name, dom in _dict(value.get("domains", {}), f"{where}.domains").items():
        at = f"{where}.domains['{name}']"
        dom = _dict(dom, at)
        _require(dom.get("kind") in ("normal", "uniform", "index"), f"{at}.kind", "must be normal, uniform or index")
        _number(dom.get("low", 0), f"{at}.low")
        _number(dom.get("high", 0), f"{at}.high")


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Raise PackageError naming the first field of ``manifest`` that a sound luodi package cannot have."""
    try:
        files = _dict(manifest["files"], "files")
        for name, pin in files.items():
            member_name(name, "files key")
            pin = _dict(pin, f"files['{name}']")
            _require(
                isinstance(pin.get("sha256"), str) and _SHA256.fullmatch(pin["sha256"]),
                f"files['{name}'].sha256",
                "must be 64 hex digits",
            )
            size = pin.get("size")
            ok = isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_MEMBER_BYTES
            _require(ok, f"files['{name}'].size", f"must be a size 0..{MAX_MEMBER_BYTES}, not {size!r:.80}")
        _specs(manifest["inputs"], "inputs")
        _specs(manifest["outputs"], "outputs")
        _targets(manifest["targets"], files, "targets")
        for name, model in _dict(manifest.get("models") or {}, "models").items():
            at = f"models['{_str(name, 'models key', 128)}']"
            model = _dict(model, at)
            _specs(model.get("inputs"), f"{at}.inputs")
            _specs(model.get("outputs"), f"{at}.outputs")
            _targets(model.get("targets"), files, f"{at}.targets")
            _require(member_name(model.get("model"), f"{at}.model") in files, f"{at}.model", "is not a pinned member")
            if model.get("shapes") is not None:
                _shape_sets(model["shapes"], f"{at}.shapes")
        example = manifest.get("example_shapes")
        if example is not None:
            for name, shape in _dict(example, "example_shapes").items():
                _shape(shape, "float64", f"example_shapes['{name}']")
                _require(all(isinstance(d, int) for d in shape), f"example_shapes['{name}']", "must hold sizes only")
        if manifest.get("shapes") is not None:
            _shape_sets(manifest["shapes"], "shapes")
        if manifest.get("pipeline") is not None:
            _dict(manifest["pipeline"], "pipeline")
        if "accuracy_budget" in manifest:
            _str(manifest["accuracy_budget"], "accuracy_budget", 64)
    except _Bad as exc:
        raise PackageError(f"{where}: manifest field {exc}; the package is corrupt or was tampered with") from None
