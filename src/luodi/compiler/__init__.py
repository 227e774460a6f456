"""The offline compiler: ``luodi.compile`` (build.py) and what it is made of.

build.py runs a compile; job.py is the per-model work, reference.py the verification against the reference,
int8.py the int8 calibration and gate, load_source.py the source (a path, ``zoo:<name>``, a graph) handed to the
frontends, export.py ``luodi.export`` (a torch module straight to a package); passes/ the graph passes.
"""

from __future__ import annotations

from .build import compile, parse_target

__all__ = ["compile", "parse_target"]
