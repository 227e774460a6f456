"""What every graph pass builds on: the Pass base class and the PassContext it reads and writes.

Apart from the package's __init__ (the pass registry, which imports every pass module), so that a pass module
imports its base class without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class PassContext:
    """What a pass may read or rewrite besides the graph: the package's pipeline spec."""

    pipeline: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    """What the pass did, in words, for the report (one pass run's notes)."""


class Pass:
    """One graph rewrite. Subclasses set ``name`` and ``summary`` and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def run(self, model: Any, ctx: PassContext) -> Any:
        raise NotImplementedError
