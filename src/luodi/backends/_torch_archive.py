"""Checks a ``torch.export`` archive (``model.pt2``) before torch opens it: what luodi accepts is data, not code.

``torch.export.load`` unpickles with ``weights_only=False`` any weight or constant marked ``use_pickle``, falls back
to a full unpickle when the sample inputs fail the weights-only one, loads AOTInductor shared libraries, resolves
node targets by attribute path under ``torch`` (``torch.os.system`` is callable) and hands symbolic shape strings
to ``sympy.sympify`` (an ``eval``). Any of these runs code from the file. This module reads the zip itself and
refuses every archive that holds anything but the members ``torch.export.save`` writes for a plain float program:
raw tensors, JSON, and sample inputs that torch's weights-only unpickler reads. It never imports torch at module
level and never unpickles except through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

from ..errors import ZIP_ERRORS, ModelError

_ROOT = "archive/"
# What torch 2.x's torch.export.save writes for one program named "model" (relative to the archive root).
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_WEIGHT = re.compile(r"weight_\d+")
_CONSTANT = re.compile(r"tensor_\d+")
_PATTERNS = {"data/weights/": _WEIGHT, "data/constants/": _CONSTANT}
# Node targets the program may call: ATen and prims operators, and the arithmetic of symbolic sizes.
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_OPERATOR = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "ge", "gt"}
_OPERATOR |= {"le", "lt", "and_", "or_", "not_"}
_SYM = {"torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sqrt"}
_SYM |= {"torch.sym_ite", "torch.sym_sum"}
# ATen operators that touch files (torch.from_file maps a path, and with shared=True writes through to it).
_FILE_OPS = re.compile(r"torch\.ops\.aten\.(from_file|_.*file.*|.*_file)\.")
# A symbolic size expression: numbers, operators and names, where a name is a shape symbol (s0, u3, ...) or one
# of the sympy functions torch's deserialiser defines (as in Symbol('s0', positive=True, integer=True)); no dots,
# brackets, names led by an underscore, nor quoted strings other than a shape symbol's name.
_EXPR_TOKEN = re.compile(
    r"\s+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z][A-Za-z0-9_]*|'[a-z]+\d+'|\*\*|//|[-+*/%(),<>=!]=?|[&|~]"
)
_SYMBOL = re.compile(r"[a-z]+\d+")
_EXPR_NAMES = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Eq",
    "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo", "Integer", "floor", "ceiling", "sqrt",
    "Symbol", "Rational", "Float", "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
}  # fmt: skip
# Python reads \r (and \r\n) as a line break where torch.fx, which writes a node's stack trace into the code it
# compiles, splits on \n alone: a string with other control characters could smuggle a statement into that code.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def check(data: bytes, where: str = "model.pt2") -> None:
    """Raise ModelError unless ``data`` is a ``torch.export`` archive that loads without running code."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except ZIP_ERRORS as exc:
        raise ModelError(f"{where} is not a torch.export archive (not a readable zip: {exc})") from None
    with zf:
        members = _members(infos, len(data), where)
        try:
            weights = _payload(zf, "data/weights/model_weights_config.json", "data/weights/", members, where)
            constants = _payload(zf, "data/constants/model_constants_config.json", "data/constants/", members, where)
            _unreferenced(members, weights | constants, where)
            program = _json(zf, "models/model.json", where)
            _walk(program, where)
            samples = zf.read(_ROOT + "data/sample_inputs/model.pt")
        except ZIP_ERRORS as exc:  # a bad CRC, an unknown compression, ...
            raise ModelError(f"{where} is not a readable torch.export archive ({exc})") from None
        _sample_inputs(samples, where)


def _refuse(where: str, what: str) -> ModelError:
    return ModelError(
        f"{where} is refused: {what}. luodi opens only torch.export programs of plain tensors and ATen operators, "
        "because anything else in a .pt2 runs code when torch loads it; export the model again with luodi "
        "(luodi.export / `luodi export`), or leave the torch target out"
    )


def _members(infos: list[zipfile.ZipInfo], size: int, where: str) -> set[str]:
    names: set[str] = set()
    for info in infos:
        name = info.filename
        rel = name[len(_ROOT) :] if name.startswith(_ROOT) else None
        if rel is None or not (rel in _FIXED or _payload_member(rel)):
            raise _refuse(where, f"it holds '{name}', which torch.export.save does not write for a plain program")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(where, f"member '{name}' is compressed; torch.export.save stores every member raw")
        if info.file_size > size:
            raise _refuse(where, f"member '{name}' declares {info.file_size} bytes, more than the whole archive")
        if name in names:
            raise _refuse(where, f"member '{name}' appears twice")
        names.add(name)
    missing = sorted(_ROOT + m for m in _FIXED if _ROOT + m not in names and not m.startswith(".data/"))
    if missing:
        raise _refuse(where, f"it lacks {missing}")
    return names


def _payload_member(rel: str) -> bool:
    return any(
        rel.startswith(folder) and pattern.fullmatch(rel[len(folder) :]) for folder, pattern in _PATTERNS.items()
    )


def _json(zf: zipfile.ZipFile, rel: str, where: str) -> Any:
    try:
        return json.loads(zf.read(_ROOT + rel))
    except (ValueError, RecursionError) as exc:
        raise _refuse(where, f"'{rel}' is not JSON ({type(exc).__name__})") from None


def _payload(zf: zipfile.ZipFile, config: str, folder: str, members: set[str], where: str) -> set[str]:
    """The members a weights/constants config refers to, each checked to be raw tensor bytes, never a pickle."""
    entries = _json(zf, config, where)
    table = entries.get("config") if isinstance(entries, dict) else None
    if not isinstance(table, dict):
        raise _refuse(where, f"'{config}' has no 'config' table")
    used = set()
    for fqn, meta in table.items():
        if not isinstance(meta, dict):
            raise _refuse(where, f"'{config}' entry '{fqn}' is not an object")
        if meta.get("use_pickle") is not False:
            raise _refuse(where, f"'{fqn}' in '{config}' is stored as a pickle (use_pickle), which torch unpickles")
        path = meta.get("path_name")
        if not isinstance(path, str) or not _PATTERNS[folder].fullmatch(path):
            raise _refuse(where, f"'{fqn}' in '{config}' names {path!r}, not a raw tensor file")
        if _ROOT + folder + path not in members:
            raise _refuse(where, f"'{fqn}' in '{config}' names '{path}', which the archive lacks")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(where, f"'{fqn}' in '{config}' has no tensor_meta")
        used.add(_ROOT + folder + path)
    return used


def _unreferenced(members: set[str], used: set[str], where: str) -> None:
    extra = sorted(m for m in members if _payload_member(m[len(_ROOT) :]) and m not in used)
    if extra:
        raise _refuse(where, f"it holds tensor files no config refers to: {extra[:3]}")


def _walk(node: Any, where: str, depth: int = 0) -> None:
    """Every node target an operator, every symbolic expression arithmetic, no string with a control character."""
    if depth > 200:
        raise _refuse(where, "models/model.json nests deeper than any exported program")
    if isinstance(node, dict):
        target = node.get("target")
        if isinstance(target, str) and "inputs" in node and "outputs" in node:
            _target(target, where)
        for key, value in node.items():
            if key == "expr_str":
                _expression(value, where)
            if isinstance(key, str) and _CONTROL.search(key):
                raise _refuse(where, f"models/model.json has a key with a control character: {key!r}")
            _walk(value, where, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _walk(value, where, depth + 1)
    elif isinstance(node, str) and _CONTROL.search(node):
        raise _refuse(where, f"models/model.json has a string with a control character: {node[:60]!r}")


def _target(target: str, where: str) -> None:
    if target.startswith("_operator.") and target.partition(".")[2] in _OPERATOR:
        return
    if target in _SYM:
        return
    if _OP_TARGET.fullmatch(target) and not _FILE_OPS.match(target):
        return
    raise _refuse(where, f"a node calls '{target[:80]}', which is not an ATen operator")


def _expression(expr: Any, where: str) -> None:
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise _refuse(where, "a symbolic size is not a short string")
    pos = 0
    while pos < len(expr):
        token = _EXPR_TOKEN.match(expr, pos)
        if token is None:
            raise _refuse(where, f"the symbolic size {expr[:60]!r} is not arithmetic")
        word = token.group()
        if word[0].isalpha() and word not in _EXPR_NAMES and not _SYMBOL.fullmatch(word):
            raise _refuse(where, f"the symbolic size {expr[:60]!r} names '{word}'")
        pos = token.end()


def _sample_inputs(data: bytes, where: str) -> None:
    """torch reads the sample inputs weights-only first and unpickles them fully when that fails: make it not fail.

    torch's weights-only unpickler is its documented way to read untrusted tensors; the same bytes give torch the
    same result, so its fallback to a full unpickle is never reached.
    """
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # UnpicklingError for a forbidden global; anything else for a damaged file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise _refuse(where, f"its sample inputs are not plain tensors ({first})") from None
