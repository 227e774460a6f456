"""RunGuard: the calls in progress on a Session's engine, so that close() frees the engine only once none uses it.

Every engine call of a session (run, forward, prepare, reshape, run_batch's chunks) holds it; see
docs/ARCHITECTURE.md, "close() under load".
"""

from __future__ import annotations

import threading
import time


class RunGuard:
    """The calls in progress on a session's engine, so that close() frees the engine only once none is using it.

    A call appends to ``inflight`` and then checks ``closing``; close() sets ``closing`` and then waits for
    ``inflight`` to empty. list.append/pop are atomic, so the hot path costs two C calls and no lock, and either
    close() sees the call's hold or the call sees ``closing`` (and gets StateError). close() polls: it is rare.
    """

    __slots__ = ("inflight", "closing", "_once")

    def __init__(self) -> None:
        self.inflight: list[None] = []
        self.closing = False
        self._once = threading.Lock()

    def close(self) -> bool:
        """Mark closing and wait for the calls in progress; False if it was closing already."""
        with self._once:
            if self.closing:
                return False
            self.closing = True
        while self.inflight:
            time.sleep(0.0005)
        return True
