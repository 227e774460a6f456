"""The per-operator profile of one target from its engine's own profiler (the backend's ``profiling`` load option
and ``Engine.profile()``), the engine's node names mapped back to the canonical graph's where the engine keeps them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import LoadOptions, get_backend
from ..errors import LuodiError
from ..package import Package

PROFILE_RUNS = 20
"""Runs profiled per target. The engines' profilers count from load, so the first run (allocations, kernel choice)
is in the per-run mean too: one part in twenty."""

_SUFFIXES = ("_nchwc", "_kernel_time", "/WithoutBiases", "/fq_weights_1")


class CanonicalNames:
    """Maps an engine's node name to the canonical graph's node: the same name, the name with the part an engine
    appends removed (OpenVINO's ``conv/WithoutBiases``, ORT's ``r_nchwc``), or the node producing a tensor of that
    name (OpenVINO names a fused node after its output). None when nothing matches (a node the engine made)."""

    def __init__(self, model: Any) -> None:
        self.nodes: set[str] = set()
        self.producer: dict[str, str] = {}
        if model is None:
            return
        for i, node in enumerate(model.graph.node):
            name = node.name or f"{node.op_type}_{i}"
            self.nodes.add(name)
            for out in node.output:
                self.producer[out] = name

    def __call__(self, engine_name: str) -> str | None:
        candidates = [engine_name]
        for suffix in _SUFFIXES:
            if engine_name.endswith(suffix):
                candidates.append(engine_name[: -len(suffix)])
        head = engine_name
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            candidates.append(head)
        for c in candidates:
            if c in self.nodes:
                return c
        for c in candidates:
            if c in self.producer:
                return self.producer[c]
        return None


def profile_target(
    pkg: Package, target: dict[str, Any], feeds: dict[str, np.ndarray], threads: int | None, top: int, model: Any
) -> dict[str, Any]:
    """``{"profiler", "runs", "total_ms", "ops": [...top N...], "note"}`` for ``target``; ``profiler`` None (and a
    note) when its engine has no profiler luodi reads."""
    backend = get_backend(target["backend"])
    if "profiling" not in backend.load_options:
        return {"profiler": None, "runs": 0, "total_ms": 0.0, "ops": [], "note": f"{backend.name}: no profiler"}
    try:
        engine = backend.load(pkg.artifact(target), LoadOptions(threads=threads, extra={"profiling": True}))
    except LuodiError as exc:
        return {"profiler": backend.name, "runs": 0, "total_ms": 0.0, "ops": [], "note": f"could not load: {exc}"}
    try:
        dtypes = {s.name: s.np_dtype for s in engine.inputs}
        own = {n: a.astype(dtypes[n], copy=False) if n in dtypes else a for n, a in feeds.items()}
        for _ in range(PROFILE_RUNS):
            engine.run(own)
        records = engine.profile() or []
    finally:
        engine.close()
    names = CanonicalNames(model)
    ops = []
    for r in records:
        calls = max(1, int(r.get("calls", 1)))
        ops.append(
            {
                "node": r["node"],
                "canonical": names(r["node"]),
                "op": r.get("op", ""),
                "kernel": r.get("kernel", ""),
                "ms": r["ms"] / calls,
                "calls": calls,
            }
        )
    total = sum(o["ms"] for o in ops)
    for o in ops:
        o["percent"] = 100.0 * o["ms"] / total if total > 0 else 0.0
    ops.sort(key=lambda o: -o["ms"])
    mapped = sum(1 for o in ops if o["canonical"])
    return {
        "profiler": backend.name,
        "runs": PROFILE_RUNS,
        "total_ms": total,
        "nodes": len(ops),
        "mapped": mapped,
        "ops": ops[:top],
        "note": "per-run mean of the engine's own node times; 'canonical' is the graph node it maps to (null: a "
        "node the engine made)",
    }
