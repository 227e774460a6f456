"""The child side of `luodi bench`'s cold start: one target loaded in a fresh Python, so its load time, first
inference and peak memory are its own and not those of the targets loaded before it.

Reads ``{"package", "target", "threads", "feeds", "spawned"}`` as JSON on stdin (feeds: an .npz path; spawned: the
parent's ``time.time()`` when it started this process) and writes one JSON object on stdout. Its own module (run as
``python -m luodi.bench._child``), above what it measures.
"""

from __future__ import annotations

import json
import sys
import time


def status_kb(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` figure of /proc/self/status in kB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    request = json.loads(sys.stdin.read())
    # From the parent's spawn: the interpreter's start and `import luodi` (run before this module, by -m).
    started_ms = (time.time() - float(request["spawned"])) * 1e3
    t0 = time.perf_counter()
    import numpy as np

    from ..backends import get_backend
    from ..selection import parse_target
    from ..session import Session

    backend, _ = parse_target(request["target"])
    get_backend(backend).require()  # the engine library imported: its cost counts as start, not as load
    t1 = time.perf_counter()
    with np.load(request["feeds"], allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    baseline = status_kb("VmRSS")
    t2 = time.perf_counter()
    session = Session(request["package"], backend=request["target"], threads=request.get("threads"))
    t3 = time.perf_counter()
    session.run(feeds)
    t4 = time.perf_counter()
    session.run(feeds)
    t5 = time.perf_counter()
    out = {
        "start_ms": started_ms + (t1 - t0) * 1e3,
        "load_ms": (t3 - t2) * 1e3,
        "first_inference_ms": (t4 - t3) * 1e3,
        "second_inference_ms": (t5 - t4) * 1e3,
        "baseline_rss_mb": None if baseline is None else baseline / 1024,
        "peak_rss_mb": None if status_kb("VmHWM") is None else status_kb("VmHWM") / 1024,  # type: ignore[operator]
        "rss_after_mb": None if status_kb("VmRSS") is None else status_kb("VmRSS") / 1024,  # type: ignore[operator]
    }
    session.close()
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
