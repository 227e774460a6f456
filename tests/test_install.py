"""The trimmed runtime: luodi's base install (numpy + onnxruntime) loads a package and runs it, importing no extra.

test_base_install_runs_a_package builds a wheel of this tree, installs it with only its own requirements into a
fresh venv (PyPI or pip's cache; ~20 s warm) and runs a package there. It is marked ``install`` and never skipped:
CI has network to PyPI. The other tests check the same import discipline in this (full) environment, where every
optional package is installed and so could be imported by mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest

import luodi
from conftest import small_cnn

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

ROOT = Path(__file__).resolve().parents[1]
# Optional packages that loading and running a package on onnxruntime must never import.
EXTRAS = ["onnx", "torch", "openvino", "ncnn", "MNN", "fastapi", "uvicorn", "ray", "click", "rich", "PIL", "cv2"]

RUN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import luodi

    pkg, x_path, y_path = sys.argv[1:4]
    x = np.load(x_path)
    with luodi.Session(pkg, backend="onnxruntime") as s:
        y = s.run({"x": x})["y"]
    with luodi.Session(pkg) as auto:  # auto must pass over targets whose engine is not installed
        chosen = auto.backend
        y_auto = auto.run({"x": x})["y"]
    np.save(y_path, np.stack([y, y_auto]))
    loaded = sorted(sys.modules)
    try:
        luodi.compile("model.onnx", "out.luodi")
        compile_error = ""
    except luodi.MissingExtraError as exc:
        compile_error = str(exc)
    print(json.dumps({"modules": loaded, "chosen": chosen, "compile_error": compile_error}))
    """
)


def _imported(modules: list[str]) -> list[str]:
    tops = {m.split(".")[0] for m in modules}
    return sorted(tops & set(EXTRAS))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("install") / "cnn.luodi"
    targets = ["onnxruntime", "reference"]
    if luodi.get_backend("openvino").available().ok:
        targets.append("openvino")
    luodi.compile(small_cnn(), out, targets=targets, name="small-cnn")
    return out


def _wheel(tmp: Path) -> Path:
    """A wheel of this tree, built from a copy so the worktree gets no build/ or egg-info."""
    src = tmp / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", str(tmp)]
    try:  # the running venv's setuptools builds it offline when it is new enough for pyproject's build-system
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            cmd.append("--no-build-isolation")
    except ImportError:
        pass
    subprocess.run([*cmd, str(src)], check=True, capture_output=True, timeout=300)
    return next(tmp.glob("luodi-*.whl"))


@pytest.mark.install
def test_base_install_runs_a_package(tmp_path: Path, package: Path) -> None:
    # Nothing of this tree or this venv may leak into the fresh one.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LUODI_CACHE_DIR"] = str(tmp_path / "cache")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    wheel = _wheel(tmp_path)
    # The wheel with its own requirements and nothing else: exactly what `pip install luodi` installs.
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True, env=env
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"luodi", "numpy", "onnxruntime"} <= installed
    assert not installed & {"onnx", "torch", "openvino", "click", "rich", "pillow", "fastapi", "ray"}, installed

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ran = subprocess.run(
        [str(py), "-c", RUN, str(package), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert any(m == "luodi.session" for m in report["modules"])
    assert next(m for m in report["modules"] if m == "luodi")  # the venv's luodi, not this tree's
    assert _imported(report["modules"]) == []
    assert report["chosen"] == "onnxruntime"
    assert "luodi[compiler]" in report["compile_error"]
    with luodi.Session(package, backend="reference") as ref:
        want = ref.run({"x": x})["y"]
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-5)

    # The CLI is an extra too: the console script says which one instead of an ImportError traceback.
    cli = subprocess.run(
        [str(env_dir / "bin" / "luodi"), "info", str(package)], capture_output=True, text=True, env=env
    )
    assert cli.returncode == 2
    assert "luodi[cli]" in cli.stderr and "Traceback" not in cli.stderr


def test_running_a_package_imports_no_extra(package: Path) -> None:
    """Here every optional package is installed, so an eager import anywhere on the run path would show."""
    code = (
        "import sys, numpy as np, luodi\n"
        f"s = luodi.Session({str(package)!r}, backend='onnxruntime')\n"
        "s.run({'x': np.zeros((1, 3, 16, 16), np.float32)})\n"
        "s.set_tensor('x', np.ones((1, 3, 16, 16), np.float32)); s.forward(); s.get_tensor('y')\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert _imported(out.stdout.split()) == []


def test_import_luodi_imports_no_engine() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, luodi; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert _imported(out.stdout.split()) == []
    assert "onnxruntime" not in out.stdout.split()


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """An optional module that cannot be imported is a MissingExtraError naming the extra, not an ImportError."""
    from luodi.extras import require

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(luodi.MissingExtraError, match=r"pip install 'luodi\[compiler\]'"):
        luodi.compile(small_cnn(), "never-written.luodi")
    with pytest.raises(luodi.MissingExtraError, match=r"the reference backend needs the 'onnx' package"):
        require("onnx", "the reference backend")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(luodi.MissingExtraError, match=r"luodi\[image\]"):
        require("PIL", "decoding an image")
    assert not Path("never-written.luodi").exists()
