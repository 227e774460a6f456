"""Checks of the arguments of luodi's public calls: a wrong type or range is an InputError naming the argument.

Without them a wrong argument surfaces deep inside (``'int' object has no attribute 'partition'``, a string
taken as a list of letters). Each check returns the value in the form the caller uses; none converts silently
between meanings, and none looks at files or engines.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InputError


def text(name: str, value: Any) -> str:
    """A str argument (a device, a backend name, a precision)."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def optional_text(name: str, value: Any) -> str | None:
    return None if value is None else text(name, value)


def threads(value: Any) -> int | None:
    """An engine thread count: None or 0 for the engine's own default, else an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"threads must be an int >= 1 (or None for the engine's default), got {value!r}")
    return value


def mapping(name: str, value: Any) -> dict[Any, Any]:
    """A dict argument (engine options, shapes); None is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{name} must be a dict, got {type(value).__name__} {value!r}")
    return dict(value)


def path(name: str, value: Any) -> str | os.PathLike[str]:
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} {value!r}")
    return value


def names(name: str, value: Any, example: str) -> list[str]:
    """A list of strings; a single string is one item (``targets="onnxruntime"``), never a list of its letters."""
    if isinstance(value, str):
        return [value]
    if value is None or isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise InputError(f"{name} must be a string or a list of strings such as {example}, got {value!r}")
    items = list(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise InputError(f"{name} must hold strings such as {example}; {bad[0]!r} is a {type(bad[0]).__name__}")
    return items


def feeds(value: Any, inputs: Iterable[str], verb: str = "run()") -> dict[Any, Any]:
    """``run``'s feeds: a dict of input name -> array, or for a model with one input that array alone."""
    if type(value) is dict:  # the common case first: run() is a hot path, and the dict is only read
        return value
    if isinstance(value, Mapping):
        return dict(value)
    input_names = list(inputs)
    if len(input_names) == 1 and hasattr(value, "shape") and hasattr(value, "dtype"):
        return {input_names[0]: value}
    got = f"a {type(value).__name__}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        got += f" for a model with {len(input_names)} inputs"
    raise InputError(
        f"{verb} takes a dict of input name -> array (e.g. {{{input_names[0]!r}: array}}), "
        f"or one array for a model with one input; got {got}. The inputs are {input_names}"
    )


def samples(name: str, value: Any) -> list[Any]:
    """A sequence of samples (feed dicts or arrays); a bare array or dict is not a sequence of them."""
    if value is None or isinstance(value, (str, bytes, Mapping)) or hasattr(value, "dtype"):
        raise InputError(f"{name} must be a list of feed dicts (input name -> array), got {type(value).__name__}")
    if not isinstance(value, Iterable):
        raise InputError(f"{name} must be a list of feed dicts (input name -> array), got {value!r}")
    return list(value)


def feed_dicts(name: str, value: Any) -> list[dict[Any, Any]]:
    items = samples(name, value)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InputError(f"{name}[{i}] must be a dict of input name -> array, got {type(item).__name__}")
    return [dict(item) for item in items]


def optional_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an int >= 1, got {value!r}")
    return value


def per_input(option: str, items: Iterable[str], form: str, example: str) -> dict[str, str]:
    """Repeated ``NAME=VALUE`` items of a command-line option (``--input-shape x=1x3x224x224``) as a dict, in order;
    an item without a name or a value, or an input given twice, is an InputError naming the option."""
    given: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(f"{option} takes {form}, e.g. {example}; got '{item}'")
        if name in given:
            raise InputError(f"{option} gives input '{name}' twice")
        given[name] = value
    return given


def engine_options(items: Iterable[str]) -> dict[str, dict[str, object]] | None:
    """Repeated ``BACKEND.KEY=VALUE`` items of ``--option`` (``rknn.platform=rk3566``) as ``target_options``
    ({"rknn": {"platform": "rk3566"}}), None when there are none; a value that reads as an int or float is one."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        backend, dot, name = key.partition(".")
        if not (eq and dot and backend and name):
            raise InputError(f"--option takes BACKEND.KEY=VALUE, e.g. rknn.platform=rk3566; got '{item}'")
        parsed: object = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        out.setdefault(backend, {})[name] = parsed
    return out or None


def parse_target(backend: str, precision: str | None = None) -> tuple[str, str | None]:
    """``"openvino:int8"`` -> ``("openvino", "int8")``, the name the CLI's ``--target`` takes; a plain name is kept.

    ``precision`` given as well must agree with the one in the name (else an InputError saying so).
    """
    if not isinstance(backend, str):
        raise InputError(f"backend must be a name such as 'onnxruntime' or 'openvino:int8', got {backend!r}")
    name, sep, given = backend.partition(":")
    if not sep:
        return backend, precision
    if not name or not given or ":" in given:
        raise InputError(f"backend '{backend}' is not BACKEND or BACKEND:PRECISION, e.g. 'openvino:int8'")
    if precision is not None and precision != given:
        raise InputError(
            f"backend='{backend}' asks for precision '{given}' but precision='{precision}' was given too; "
            "give the precision once"
        )
    return name, given
