"""Optional dependencies: import one lazily, or raise MissingExtraError naming the luodi extra that installs it.

The base install is numpy + onnxruntime (load a package, run it); nothing here may import an optional package eagerly.
"""

from __future__ import annotations

from types import ModuleType

from .errors import MissingExtraError

# The extra that installs each optional module, as pyproject.toml's [project.optional-dependencies] names it.
EXTRA_OF = {
    "onnx": "compiler",
    "click": "cli",
    "rich": "cli",
    "PIL": "image",
    "cv2": "pipelines",
    "torch": "torch",
    "openvino": "openvino",
    "ncnn": "ncnn",
    "MNN": "mnn",
    "fastapi": "serve",
    "uvicorn": "serve",
    "ray": "ray",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` (e.g. "compiling a model"), or say which luodi extra installs it."""
    from .telemetry import import_engine

    try:
        return import_engine(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top)
        hint = f"pip install 'luodi[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{feature} needs the '{top}' package, which is not installed here (the base luodi install only "
            f"loads and runs packages); install it with: {hint}"
        ) from exc
