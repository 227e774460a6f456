"""Real labelled pictures that ship inside PyPI packages, for demos, tests and calibration.

Only file lookup: the packages are found on disk without importing them (foolbox's import is heavy).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MissingExtraError


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the '{module}' package is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def foolbox_imagenet() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet validation pictures in foolbox: (path, ImageNet class index)."""
    folder = _package_dir("foolbox", "pip install --no-deps foolbox") / "data"
    return [(p, int(p.stem.rsplit("_", 1)[1])) for p in sorted(folder.glob("imagenet_*_*.jpg"))]


def skimage_picture(name: str) -> Path:
    """The path of a scikit-image sample picture shipped in the wheel, e.g. "chelsea" or "coffee"."""
    folder = _package_dir("skimage", "pip install scikit-image") / "data"
    hits = sorted(folder.glob(f"{name}.*"))
    if not hits:
        raise MissingExtraError(f"scikit-image has no sample picture '{name}' in {folder}")
    return hits[0]
