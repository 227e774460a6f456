"""A compiled target's manifest entry: its files stored once in the package (by sha256), its options.

Shared by the package's main model and the further models of a multi-model package; it never compiles.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..backends.base import Artifact, Backend
from ..package.archive import target_dir


def target_entry(
    backend: Backend,
    precision: str,
    artifact: Artifact,
    prefix: str,
    members: dict[str, bytes],
    by_sha: dict[str, str],
) -> dict[str, Any]:
    """Add ``artifact``'s files to ``members`` under ``<prefix>targets/<backend>-<precision>/`` (identical bytes
    are stored once, found through ``by_sha``) and return the target's manifest entry."""
    files = {}
    for rel, data in artifact.files.items():
        where = f"{prefix}{target_dir(backend.name, precision)}/{rel}"
        member = by_sha.setdefault(hashlib.sha256(data).hexdigest(), where)
        members.setdefault(member, data)
        files[rel] = member
    return {
        "backend": backend.name,
        "precision": precision,
        "files": files,
        "options": artifact.options,
        "engine_version": backend.available().version,
    }


def store_model(model: Any, member: str, members: dict[str, bytes], by_sha: dict[str, str]) -> str:
    """Add an ONNX graph to ``members`` as ``member`` (stored once: identical bytes reuse the first member) and
    return the member that holds it. A model over 2 GB is stored as ONNX external data: the graph, whose large
    tensors reference ``<member>.data``, and that data file beside it (see luodi.onnx_io)."""
    from ..onnx_io import to_members

    parts = to_members(model, member)
    if len(parts) > 1:  # graph and data find each other by name: stored side by side, never redirected
        for name, data in parts.items():
            members[name] = data
            by_sha.setdefault(hashlib.sha256(data).hexdigest(), name)  # a target holding the same bytes reuses them
        return member
    data = parts[member]
    stored = by_sha.setdefault(hashlib.sha256(data).hexdigest(), member)
    members.setdefault(stored, data)
    return stored
