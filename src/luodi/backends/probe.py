"""Prove an engine file harmless in a child process before this process loads it: one load, one run per shape set.

For engines whose loader or kernels crash the process on a malformed file (``Backend.crash_prone``: ncnn, MNN).
The artifact goes to ``python -m luodi.backends._probe_child`` through a pipe (a JSON header, then the files' raw
bytes: nothing is pickled and nothing is written to disk, so a decrypted model never touches it); the child
loads it from memory files, runs it once at each representative shape set and reports on its stdout. A
child killed by a signal is a BackendError naming the target; an artifact that passed is remembered under
``<cache>/probed/<sha256>`` (files, options, shapes and engine version), so the cost is paid once per host
(a decrypted artifact is never remembered: an encrypted package leaves nothing on disk, so it is probed per load).
A clean error while loading is raised as the child raised it; a file that loads but fails to run at those shapes is
refused as malformed, because a malformed file that fails cleanly once may crash (or corrupt memory) the next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..paths import cache_dir, child_env
from .contract import Artifact, Shapes

PROBE_VERSION = 2
"""Part of the cache key: bump it when what the probe proves changes."""
TIMEOUT_S = 300.0


def cache_key(artifact: Artifact, shapes: list[Shapes], engine_version: str) -> str:
    """sha256 over what decides whether the engine crashes: the files, the options, the shapes, the engine."""
    h = hashlib.sha256()
    head = {
        "probe": PROBE_VERSION,
        "backend": artifact.backend,
        "precision": artifact.precision,
        "engine": engine_version,
        "options": artifact.options,
        "shapes": [{n: list(s) for n, s in sorted(sh.items())} for sh in shapes],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(artifact.files.items())},
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _marker(key: str) -> Path:
    return cache_dir() / "probed" / key


def passed_before(key: str) -> bool:
    return _marker(key).is_file()


def _remember(key: str, artifact: Artifact, seconds: float) -> None:
    marker = _marker(key)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{key}.{os.getpid()}")
        tmp.write_text(json.dumps({"target": artifact.target, "probe_s": round(seconds, 3), "at": time.time()}))
        os.replace(tmp, marker)
    except OSError:
        pass  # a read-only home must not stop inference; the probe runs again next time


def prove_in_child(artifact: Artifact, shapes: list[Shapes], engine_version: str = "", remember: bool = True) -> None:
    """Load and run ``artifact`` in a child process unless it passed before; BackendError if the child crashes.

    ``remember=False``: a one-off check (a converter's output at compile time) that leaves no verdict behind.
    """
    key = cache_key(artifact, shapes, engine_version)
    if remember and passed_before(key):
        return
    t0 = time.perf_counter()
    outcome = _run_child(artifact, shapes)
    if outcome.get("status") == "ok":
        if remember and not artifact.in_memory:  # a decrypted artifact leaves no trace on disk, not even a hash
            _remember(key, artifact, time.perf_counter() - t0)
    elif outcome.get("during") == "run":
        # It loads but cannot run where the compiler verified it: its layers disagree with each other, and in this
        # process such a run may write out of bounds without crashing at once (a later call would).
        said = f"; {artifact.backend} said: {outcome['said']}" if outcome.get("said") else ""
        raise BackendError(
            f"the {artifact.target} engine file is malformed: it loads but fails to run at the package's "
            f"representative shapes ({outcome.get('error', '')[:300]}{said}); recompile the package or choose "
            "another target"
        )
    else:
        # A clean refusal while loading, raised here as the child raised it: loading it in this process to let it
        # say so itself is no safer, since a malformed file that failed cleanly once may crash the next time.
        raise _as_error(outcome.get("type", ""), outcome.get("error", ""))


def _as_error(name: str, message: str) -> Exception:
    from .. import errors

    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.LuodiError)):
        cls = BackendError
    return cls(message)


def _payload(artifact: Artifact, shapes: list[Shapes]) -> bytes:
    names = sorted(artifact.files)
    head = {
        "backend": artifact.backend,
        "precision": artifact.precision,
        "options": artifact.options,
        "files": [[n, len(artifact.files[n])] for n in names],
        "shapes": [{n: list(s) for n, s in sh.items()} for sh in shapes],
    }
    return b"".join([json.dumps(head).encode(), b"\n", *(artifact.files[n] for n in names)])


def _run_child(artifact: Artifact, shapes: list[Shapes]) -> dict[str, Any]:
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "luodi.backends._probe_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the child's reports only: it sends the engine's own printing to stderr
            stderr=subprocess.PIPE,
            env=child_env(),
        )
    except OSError as exc:
        raise BackendError(f"could not start a process to check the {artifact.target} engine file: {exc}") from exc
    try:
        out, err = proc.communicate(_payload(artifact, shapes), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BackendError(
            f"the {artifact.target} engine file did not load and run within {TIMEOUT_S:.0f} s in a check "
            "process; it is probably malformed: recompile the package or choose another target"
        ) from None
    except BrokenPipeError:  # the child died before reading everything
        out, err = proc.communicate()
    lines = out.decode("utf-8", "replace").splitlines()
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    final = events[-1] if events and events[-1].get("status") in ("ok", "error") else None
    if proc.returncode == 0 and final is not None:
        said = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        return {**final, "said": said[0][:300] if said else ""}  # the engine's own first complaint
    stage = events[-1].get("stage", "loading it") if events else "starting"
    if proc.returncode < 0:
        try:
            how = f"crashed ({signal.Signals(-proc.returncode).name})"
        except ValueError:
            how = f"was killed by signal {-proc.returncode}"
    else:
        tail = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:300]
        how = f"exited with status {proc.returncode}" + (f" ({tail})" if tail else "")
    raise BackendError(
        f"the {artifact.target} engine file is malformed: {artifact.backend} {how} while {stage} in a check "
        "process (this process is unaffected); recompile the package or choose another target"
    )


# -- the child --------------------------------------------------------------------------------------------------
def limit_memory() -> None:
    """Cap the child's address space at half the machine's memory (at least 4 GiB): a runaway allocation aborts."""
    try:
        import resource

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = max(total // 2, 4 << 30)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the probe payload ended early")
    return data
