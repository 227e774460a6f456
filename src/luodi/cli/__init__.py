"""The `luodi` command: a thin layer over the Python API (whatever it does, a program can do)."""

from __future__ import annotations

import sys


def main() -> None:
    """The console script: the CLI needs click and rich (``luodi[cli]``), which the base install leaves out."""
    from ..errors import MissingExtraError
    from ..extras import require

    try:
        require("click", "the luodi command")
        require("rich", "the luodi command")
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from .main import main as run

    run()
