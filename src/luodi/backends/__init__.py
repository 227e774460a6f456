"""The backend registry: every ``luodi/backends/<name>.py`` file, plus the ``luodi.backends`` entry points.

A backend is found by name; its engine library is imported only when the backend is used.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import BackendError, BackendNotFoundError, LuodiError, PackageError
from .base import Artifact, Availability, Backend, CompileOptions, Engine, LoadOptions

__all__ = [
    "Artifact",
    "Availability",
    "Backend",
    "CompileOptions",
    "Engine",
    "LoadOptions",
    "get_backend",
    "load_engine",
    "backend_names",
    "open_engine",
    "run_once",
]

ENTRY_POINT_GROUP = "luodi.backends"
# Modules here that are no backend: the contract and the helpers several backends share (a module whose name starts
# with "_" is never one either: converters such as _pnnx, shared data such as _int8).
_NOT_BACKENDS = {"base", "contract", "onnx_compat", "probe", "shapes"}
_cache: dict[str, Backend] = {}


def _builtin_names() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_BACKENDS and not m.name.startswith("_")
    )


def _plugins() -> dict[str, Any]:
    from importlib.metadata import entry_points  # ~35 ms: paid when a plugin is looked up, not by `import luodi`

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every known backend name: built-in files first, then plugins."""
    names = _builtin_names()
    return names + sorted(n for n in _plugins() if n not in names)


def _backend_class_in(module: Any) -> type[Backend]:
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Backend) and v is not Backend and v.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise BackendError(f"module {module.__name__} must define exactly one Backend subclass, found {len(found)}")
    return found[0]


def get_backend(name: str) -> Backend:
    """The Backend called ``name``; raises BackendNotFoundError listing the known names."""
    if name in _cache:
        return _cache[name]
    if name in _builtin_names():
        cls = _backend_class_in(importlib.import_module(f"{__name__}.{name}"))
    else:
        ep = _plugins().get(name)
        if ep is None:
            raise BackendNotFoundError(
                f"no backend named '{name}'; known backends: {', '.join(backend_names())}. "
                "Run `luodi backends` to see which can run here."
            )
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take luodi down with a raw traceback
            raise BackendError(f"plugin backend '{name}' ({ep.value}) failed to load: {exc}") from exc
        cls = _backend_class_in(obj) if isinstance(obj, types.ModuleType) else obj
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BackendError(f"plugin backend '{name}' ({ep.value}) is not a luodi Backend subclass")
    own = getattr(cls, "name", None)
    if own != name:
        raise BackendError(f"backend class {cls.__qualname__} is registered as '{name}' but names itself '{own}'")
    try:
        backend = cls()
    except Exception as exc:  # a plugin's constructor is foreign code
        raise BackendError(f"backend '{name}' failed to start: {exc}") from exc
    _cache[name] = backend
    return backend


def load_engine(artifact: Artifact, options: LoadOptions) -> Engine:
    """The backend's load(); whatever it raises becomes a LuodiError naming the target."""
    try:
        return get_backend(artifact.backend).load(artifact, options)
    except LuodiError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # A backend reads its target's recorded options (tensor specs, flags) as it wrote them; a damaged or
        # hand-edited manifest fails there, in any backend, plugins included: say so instead of a raw KeyError.
        raise PackageError(
            f"the package's {artifact.target} target cannot be loaded: its recorded options are malformed "
            f"({type(exc).__name__}: {exc}); recompile the package for this target"
        ) from exc
    except Exception as exc:
        # An engine's own reader refusing a malformed file in its own way (torch's deserialiser asserts).
        detail = (str(exc).strip().splitlines() or [""])[-1][:300]
        raise BackendError(
            f"{artifact.backend} could not load the package's {artifact.target} engine file, which is malformed "
            f"({type(exc).__name__}: {detail}); recompile the package or choose another target"
        ) from exc


def open_engine(
    backend: str | Backend,
    source: Any,
    compile_options: CompileOptions | None = None,
    load_options: LoadOptions | None = None,
) -> Engine:
    """``source`` loaded on ``backend``: an Artifact as it is, a model (onnx.ModelProto) compiled in memory first.

    The engine is a context manager: ``with open_engine("onnxruntime", model) as engine:`` closes it on the way out.
    """
    b = get_backend(backend) if isinstance(backend, str) else backend
    artifact = source if isinstance(source, Artifact) else b.compile(source, compile_options or CompileOptions())
    return b.load(artifact, load_options or LoadOptions())


def run_once(
    backend: str | Backend,
    source: Any,
    feeds: Iterable[dict[str, np.ndarray]],
    compile_options: CompileOptions | None = None,
    load_options: LoadOptions | None = None,
) -> list[dict[str, np.ndarray]]:
    """Load ``source`` (see :func:`open_engine`), run every feed dict of ``feeds`` in order, close: the outputs."""
    with open_engine(backend, source, compile_options, load_options) as engine:
        return [engine.run(f) for f in feeds]
