"""Text from a package, a licence or an error, made safe to print: shown, never obeyed by the terminal or by rich.

A manifest's name, description, labels, op names and reasons are written by whoever made the package. Printed raw,
an ANSI escape clears the screen, a carriage return overwrites a line with a fake one, and rich markup restyles
or hides text. :func:`text` shows every control character as its escape (``\\x1b``, ``\\r``, ``\\n``) and rich
markup as literal brackets. It never shortens or otherwise rewrites what it is given.
"""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape

# C0 and C1 controls, DEL, and the Unicode characters that reorder or break lines (bidi overrides, isolates and the
# line/paragraph separators), which can make a printed line read differently from what it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _shown(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def plain(value: Any) -> str:
    """``str(value)`` with control characters as escapes (for output that rich does not parse, e.g. click.echo)."""
    return _CONTROL.sub(_shown, str(value))


def text(value: Any) -> str:
    """``str(value)`` ready for rich: control characters as escapes, markup as literal text."""
    return escape(plain(value))
