"""`luodi bench`: latency, throughput, memory and per-operator profiles of a package's targets (measure.py, profile.py),
the report's JSON layout (schema.py), its self-contained HTML (report.py). See docs/bench.md."""

from __future__ import annotations

from .measure import Plan, bench
from .schema import SCHEMA, SCHEMA_VERSION

__all__ = ["Plan", "SCHEMA", "SCHEMA_VERSION", "bench"]
