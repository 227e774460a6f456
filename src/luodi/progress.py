"""Progress of long steps (conversion per target, calibration, fallback search, verification, tuning): rich
progress bars with the elapsed time on stderr.

Silent when asked (``-q``) and when stderr is not a terminal; it never prints to stdout, where results go.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class Progress:
    """One line per step with a spinner and its elapsed time; ``step`` is a context manager, ``note`` a message.

    ``Progress(quiet=True)`` (or a stderr that is not a terminal) shows nothing; the steps still run.
    """

    def __init__(self, quiet: bool = False, console: Any = None) -> None:
        self.console = console
        self.enabled = False
        if not quiet:  # a quiet one needs no rich: the runtime-only install compiles without the CLI extra
            from rich.console import Console

            self.console = console or Console(stderr=True)
            self.enabled = self.console.is_terminal and sys.stderr.isatty()
        self._bars: Any = None
        self._depth = 0  # the CLI opens it around a compile that opens it again: one display for both

    def __enter__(self) -> Progress:
        self._depth += 1
        if self.enabled and self._bars is None:
            from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[count]}", style="dim"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._bars is not None and self._depth == 0:
            self._bars.__exit__(*exc)
            self._bars = None

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Step]:
        """A step shown while it runs and kept with its elapsed time when done; ``total`` items for a bar."""
        task = None
        if self._bars is not None:
            task = self._bars.add_task(description, total=total, count=f"0/{total}" if total else "")
        handle = Step(self._bars, task, total)
        try:
            yield handle
        finally:
            if task is not None:
                self._bars.update(task, completed=total or 1, total=total or 1)
                self._bars.stop_task(task)

    def note(self, message: str) -> None:
        """A message between the steps (shown only when progress is)."""
        if self._bars is not None:
            self._bars.console.print(f"[dim]{message}[/]", highlight=False)


class Step:
    """One running step: ``advance()`` after each item, ``describe()`` to say what it is doing now."""

    def __init__(self, bars: Any, task: Any, total: int | None) -> None:
        self._bars, self._task, self._total, self._done = bars, task, total, 0

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._task is not None:
            count = f"{self._done}/{self._total}" if self._total else ""
            self._bars.update(self._task, advance=n, count=count)

    def describe(self, description: str) -> None:
        if self._task is not None:
            self._bars.update(self._task, description=description)
