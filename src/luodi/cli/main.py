"""The `luodi` entry point: the click group with every command registered on it.

The group and what commands share live in app.py; each command group is its own module and registers onto the
group when imported here. Only this module imports them, so nothing in cli/ imports in a circle.
"""

from __future__ import annotations

from ..serve.cli import batch, serve  # `luodi serve` / `luodi batch --ray`: FastAPI and Ray imported when run
from . import (  # noqa: F401 - each registers its commands
    bench,
    catalog,
    compile,
    info,
    quant,
    run,
    security,
    toolchain,
    verify,
)
from .app import cli

cli.add_command(serve)
cli.add_command(batch)


def main() -> None:
    cli(prog_name="luodi")


if __name__ == "__main__":
    main()
