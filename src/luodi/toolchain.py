"""Vendor toolchains in their own Python environments: specs kept here, installed on demand into luodi's cache.

A vendor's converter often pins what luodi cannot live with (rknn-toolkit2 wants numpy<=1.26 and onnx<=1.18): it gets
a virtual environment of its own under :func:`toolchains_dir`, and the backend drives it through a bare worker
process (luodi.worker: files and arrays in and out, a crash is an error). A spec is data: the pinned requirements,
those installed ``--no-deps`` afterwards (a vendor wheel whose own pins would pull a CUDA torch) and an import that
proves the environment works. ``luodi toolchain install NAME`` builds it in a temporary sibling folder and renames it
into place, with a marker holding the spec's hash: a folder without the marker (an install that died) or with
another hash (the spec changed) is reported, never used.

A low module: it imports nothing of luodi but errors and paths, so backends may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BackendError, BackendUnavailableError, InputError
from .paths import cache_dir

MARKER = ".luodi-toolchain.json"


@dataclass(frozen=True)
class ToolchainSpec:
    """One toolchain: what ``pip install`` puts in its environment and the import that proves it works."""

    name: str
    requirements: tuple[str, ...]
    """Installed first, with their dependencies (pinned so that nothing pulls a CUDA build)."""
    no_deps: tuple[str, ...] = ()
    """Installed afterwards with ``--no-deps``: a vendor wheel whose own pins cannot be met as they stand."""
    check: str = ""
    """Python source run in the environment after the install (``-I``); it must exit 0."""
    summary: str = ""
    used_by: tuple[str, ...] = ()
    """The backends that run in it."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables the install's pip runs with (e.g. a CPU-only index)."""

    def digest(self) -> str:
        """The spec's hash, with this Python's version (a venv is built on one interpreter): what the marker holds."""
        text = json.dumps(
            [self.requirements, self.no_deps, self.check, f"{sys.version_info[0]}.{sys.version_info[1]}"],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# torch: rknn-toolkit2 imports it, and pins torch<=2.4, whose PyPI wheel pulls about 12 CUDA packages; the CPU build
# of 2.13 (the version luodi's own Makefile takes) is installed first and the toolkit beside it --no-deps.
# setuptools<75: the toolkit imports pkg_resources, which newer setuptools no longer ships.
SPECS: dict[str, ToolchainSpec] = {
    "rknn": ToolchainSpec(
        name="rknn",
        requirements=(
            "protobuf>=4.21.6,<=4.25.4",
            "psutil",
            "ruamel.yaml",
            "scipy",
            "tqdm",
            "opencv-python-headless",
            "fast-histogram",
            "numpy<=1.26.4",
            "onnx==1.18.0",
            "onnxruntime",
            "torch==2.13.0",
        ),
        no_deps=("rknn-toolkit2==2.5.0", "setuptools<75"),
        check="from rknn.api import RKNN",
        summary="Rockchip rknn-toolkit2 2.5.0: ONNX -> .rknn for RK3588 and other Rockchip NPUs, and its x86 simulator",
        used_by=("rknn",),
    ),
    # onnx2tf 1.29 pins tensorflow==2.19.0 (the full build) and tf-keras requires it too: both go in --no-deps beside
    # tensorflow-cpu 2.19.0 (the same code without the GPU kernels). Of its other pins only what the ONNX -> float
    # .tflite path imports or runs: onnx-graphsurgeon, sng4onnx and sne4onnx (not the whole
    # simple-onnx-processing-tools set), onnxruntime (its shape checks), onnxsim (run as a command), ai-edge-litert
    # (it reads back what it wrote); opencv (only its ImageDecoder op) is left out.
    "onnx2tf": ToolchainSpec(
        name="onnx2tf",
        requirements=(
            "tensorflow-cpu==2.19.0",
            "numpy==1.26.4",
            "onnx==1.19.1",
            "onnxruntime==1.23.0",
            "onnxsim==0.4.36",
            "onnx-graphsurgeon==0.5.8",
            "sng4onnx==2.0.1",
            "sne4onnx==2.0.1",
            "ai-edge-litert==2.1.0",
            "protobuf==4.25.5",
            "h5py==3.11.0",
            "ml-dtypes==0.5.1",
            "flatbuffers==25.12.19",
            "psutil==5.9.5",
            "requests==2.32.5",
        ),
        no_deps=("tf-keras==2.19.0", "onnx2tf==1.29.24"),
        check="import onnx2tf, tensorflow, onnxsim, tf_keras",
        summary="onnx2tf 1.29 on TensorFlow 2.19 (CPU): ONNX -> float .tflite, the litert route for ONNX sources",
        used_by=("litert",),
    ),
}


def toolchains_dir() -> Path:
    """Where toolchains live: $LUODI_TOOLCHAINS_DIR, else the cache folder's ``toolchains/``."""
    return Path(os.environ.get("LUODI_TOOLCHAINS_DIR") or cache_dir() / "toolchains")


def spec(name: str) -> ToolchainSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise InputError(f"no toolchain named '{name}'; known toolchains: {', '.join(sorted(SPECS))}") from None


@dataclass(frozen=True)
class Status:
    """A toolchain's state here: ``installed``, ``missing``, ``stale`` (built from another spec) or ``broken``."""

    name: str
    state: str
    path: Path
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "installed"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def size(self) -> int:
        """Bytes on disk (0 when there is nothing)."""
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_size
        return total


def status(name: str) -> Status:
    """What is at the toolchain's place, read from its marker (cheap: nothing is imported or run)."""
    s = spec(name)
    path = toolchains_dir() / name
    if not path.exists():
        return Status(name, "missing", path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return Status(name, "broken", path, "it has no install marker (an install that did not finish)")
    if not isinstance(marker, dict) or marker.get("spec") != s.digest():
        return Status(name, "stale", path, "it was installed from another version of the spec")
    if not (path / "bin" / "python").exists():
        return Status(name, "broken", path, "its Python is gone")
    return Status(name, "installed", path)


def install_command(name: str) -> str:
    return f"luodi toolchain install {name}"


def python_for(name: str, backend: str) -> str:
    """The toolchain's Python, or a BackendUnavailableError naming the command that installs it."""
    st = status(name)
    if st.ok:
        return str(st.python)
    why = {"missing": "is not installed"}.get(st.state, f"at {st.path} is {st.state} ({st.detail})")
    raise BackendUnavailableError(
        f"backend '{backend}' needs the '{name}' toolchain, which {why}; install it with: {install_command(name)}"
    )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One install or removal at a time in ``root`` (two `make test` runs at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install(name: str, *, force: bool = False, log: Callable[[str], None] | None = None) -> Status:
    """Build the toolchain's environment (a no-op when it is installed from this spec, unless ``force``).

    Built in a temporary sibling folder, checked with the spec's import, then renamed into place; a failure leaves
    the old state as it was and raises a LuodiError with pip's last lines.
    """
    say = log or (lambda _m: None)
    s = spec(name)
    root = toolchains_dir()
    with _locked(root):
        st = status(name)
        if st.ok and not force:
            say(f"toolchain {name} is installed at {st.path}")
            return st
        tmp = root / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        try:
            say(f"creating an environment for {name} in {tmp}")
            _run([sys.executable, "-m", "venv", str(tmp)], "creating its virtual environment")
            py = str(tmp / "bin" / "python")
            pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            env = {**os.environ, **s.env}
            env.pop("PYTHONPATH", None)
            say(f"pip install {' '.join(s.requirements)}")
            _run([*pip, *s.requirements], "installing its requirements", env)
            if s.no_deps:
                say(f"pip install --no-deps {' '.join(s.no_deps)}")
                _run([*pip, "--no-deps", *s.no_deps], "installing its packages without dependencies", env)
            if s.check:
                _run([py, "-I", "-c", s.check], f"checking it ({s.check})", env)
            _relocate(tmp, st.path)
            marker = {"name": name, "spec": s.digest(), "python": sys.version.split()[0], "installed": time.time()}
            (tmp / MARKER).write_text(json.dumps(marker))
            if st.path.exists():
                shutil.rmtree(st.path)
            os.replace(tmp, st.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"toolchain {name} installed at {st.path} in {time.monotonic() - started:.0f} s")
        return status(name)


def remove(name: str) -> bool:
    """Delete the toolchain's environment; whether there was one."""
    spec(name)
    root = toolchains_dir()
    with _locked(root):
        path = root / name
        if not path.exists():
            return False
        shutil.rmtree(path)
        return True


def _relocate(built: Path, final: Path) -> None:
    """Point the environment's scripts at the place it is renamed to: pip writes each console script (``onnxsim``,
    which onnx2tf runs as a command) with a ``#!`` line naming the Python of the folder it was built in, and the
    activate scripts name that folder too."""
    old, new = str(built).encode(), str(final).encode()
    for f in (built / "bin").iterdir():
        if f.is_symlink() or not f.is_file() or f.stat().st_size > 1 << 20:
            continue
        data = f.read_bytes()
        if old in data and b"\0" not in data:
            f.write_bytes(data.replace(old, new))


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise BackendError(f"toolchain install failed while {what} (exit status {proc.returncode}):\n{tail}")
