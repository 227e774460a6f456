"""A toolchain child's output into a log file: what its converter prints on fd 1 and 2 (Python and native code
alike) is kept there, to give the last lines with an error, and shown nowhere otherwise.

Imported by the bare children (``_rknn_child``, ``_onnx2tf_child``), so it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def redirected(path: str) -> Iterator[None]:
    """fd 1 and 2 appended to ``path`` for the duration, then restored."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
