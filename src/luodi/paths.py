"""Where luodi keeps things on this host: its cache folder, and the folder a child Python imports luodi from.

A low module: it imports nothing of luodi, so every layer (backends, selection, worker) may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """luodi's cache folder: $LUODI_CACHE_DIR, else ~/.cache/luodi (timings, probed engine files, toolchains)."""
    return Path(os.environ.get("LUODI_CACHE_DIR") or Path.home() / ".cache" / "luodi")


def source_root() -> Path:
    """The folder holding this ``luodi`` package (site-packages, or a checkout's src/)."""
    return Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """This process's environment, with PYTHONPATH leading to this luodi: a child ``python -m luodi...`` then runs
    the same code as its parent, even from a checkout that is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source_root()), env.get("PYTHONPATH")) if p)
    return env
