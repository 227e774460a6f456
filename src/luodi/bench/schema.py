"""The layout of `luodi bench --json` as a JSON Schema (draft 2020-12), documented in docs/bench.md. ``schema`` names
the version: a field is added under the same version, a field removed or changed in meaning gets a new one."""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = "luodi.bench/1"

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR = {"type": "string"}

RESULT: dict[str, Any] = {
    "type": "object",
    "required": [
        "batch",
        "concurrency",
        "calls",
        "samples",
        "wall_s",
        "min_ms",
        "p25_ms",
        "p50_ms",
        "p75_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "throughput_per_s",
        "histogram",
    ],  # fmt: skip
    "properties": {
        "batch": {"type": "integer", "minimum": 1},
        "concurrency": {"type": "integer", "minimum": 1},
        "calls": {"type": "integer", "minimum": 1},
        "samples": {"type": "integer", "minimum": 1},
        **{k: {"type": "number", "minimum": 0} for k in ("wall_s", "throughput_per_s")},
        **{
            f"{k}_ms": {"type": "number", "minimum": 0}
            for k in ("min", "p25", "p50", "p75", "p90", "p99", "max", "mean")
        },
        "histogram": {
            "type": "object",
            "required": ["edges_ms", "counts"],
            "properties": {
                "edges_ms": {"type": "array", "items": _NUM},
                "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        },
    },
}

COLD_START: dict[str, Any] = {
    "type": ["object", "null"],
    "properties": {
        **{k: _NUM for k in ("start_ms", "load_ms", "first_inference_ms", "second_inference_ms")},
        **{k: _NUM_OR_NULL for k in ("baseline_rss_mb", "peak_rss_mb", "rss_after_mb")},
        "error": _STR,
    },
}

PROFILE: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["profiler", "runs", "total_ms", "ops"],
    "properties": {
        "profiler": {"type": ["string", "null"]},
        "runs": {"type": "integer"},
        "total_ms": _NUM,
        "nodes": {"type": "integer"},
        "mapped": {"type": "integer"},
        "note": _STR,
        "ops": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node", "canonical", "op", "ms", "percent"],
                "properties": {
                    "node": _STR,
                    "canonical": {"type": ["string", "null"]},
                    "op": _STR,
                    "kernel": _STR,
                    "ms": _NUM,
                    "calls": {"type": "integer"},
                    "percent": _NUM,
                },
            },
        },
    },
}

TARGET: dict[str, Any] = {
    "type": "object",
    "required": [
        "target",
        "backend",
        "precision",
        "engine_version",
        "artifact_bytes",
        "accuracy",
        "cold_start",
        "engine_memory_mb",
        "results",
        "overhead",
        "profile",
        "error",
    ],  # fmt: skip
    "properties": {
        "target": _STR,
        "backend": _STR,
        "precision": _STR,
        "engine_version": _STR,
        "artifact_bytes": {"type": "integer", "minimum": 0},
        "accuracy": {
            "type": ["object", "null"],
            "required": ["metric", "value"],
            "properties": {"metric": {"enum": ["cosine", "top1_agreement"]}, "value": _NUM, "top1_agreement": _NUM},
        },
        "cold_start": COLD_START,
        "engine_memory_mb": _NUM_OR_NULL,
        "results": {"type": "array", "items": RESULT},
        "overhead": {
            "type": ["object", "null"],
            "properties": {
                "session_p50_ms": _NUM,
                "engine_p50_ms": _NUM,
                "overhead_us": _NUM,
                "calls": {"type": "integer"},
                "error": _STR,
            },
        },
        "profile": PROFILE,
        "error": {"type": ["string", "null"]},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "luodi bench report",
    "type": "object",
    "required": ["schema", "luodi_version", "created", "host", "model", "settings", "targets", "skipped", "pareto"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "luodi_version": _STR,
        "created": _STR,
        "host": {
            "type": "object",
            "required": ["cpu", "cores", "platform"],
            "properties": {"key": _STR, "cpu": _STR, "cores": {"type": ["integer", "null"]}, "platform": _STR},
        },
        "model": {
            "type": "object",
            "required": ["name", "path", "source", "package_bytes", "inputs"],
            "properties": {
                "name": _STR,
                "path": _STR,
                "source": {"enum": ["package", "onnx"]},
                "package_bytes": {"type": "integer"},
                "inputs": {"type": "array"},
            },
        },
        "settings": {
            "type": "object",
            "required": ["batches", "concurrency", "threads", "duration_s", "iterations", "rounds", "shapes"],
            "properties": {
                "batches": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "concurrency": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "threads": {"type": ["integer", "null"]},
                "duration_s": _NUM_OR_NULL,
                "iterations": {"type": ["integer", "null"]},
                "rounds": {"type": "integer"},
                "shapes": {"type": "object"},
            },
        },
        "targets": {"type": "array", "items": TARGET},
        "skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["target", "reason"],
                "properties": {"target": _STR, "reason": _STR},
            },
        },
        "pareto": {"type": "array", "items": _STR},
        "process_peak_rss_mb": _NUM,
        "notes": {"type": "array", "items": _STR},
    },
}
