"""A new platform is one Backend class in its own installable package, found via ``luodi.backends``.

The plugin under tests/data/luodi_numpy_plugin is pip-installed into the running environment for this
module; every luodi call then runs in a fresh interpreter, because entry points come from installed
metadata and the backend registry caches what it found.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SRC = Path(__file__).parent / "data" / "luodi_numpy_plugin"
DIST = "luodi-numpy-plugin"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the plugin package (from a copy, so builds leave the repo tree clean); remove it after."""
    copy = tmp_path_factory.mktemp("plugin") / PLUGIN_SRC.name
    shutil.copytree(PLUGIN_SRC, copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    done = _pip("install", "--no-deps", "--no-build-isolation", "-q", str(copy))
    if done.returncode != 0:  # no setuptools/wheel in this environment: let pip fetch them
        done = _pip("install", "--no-deps", "-q", str(copy))
    assert done.returncode == 0, f"pip could not install the plugin:\n{done.stdout}\n{done.stderr}"
    yield copy
    _pip("uninstall", "-y", "-q", DIST)


def _python(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout, failing the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, f"subprocess failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


MLP = """
import numpy as np
from onnx import TensorProto, helper, numpy_helper

def mlp(seed=0):
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1, alpha=0.5),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
"""


@pytest.mark.slow
def test_backends_cli_lists_the_plugin(plugin: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "luodi", "backends"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if " numpy " in f" {line} "]
    assert rows, f"`luodi backends` does not list numpy:\n{done.stdout}"
    assert "yes" in rows[0], f"numpy is listed but not available:\n{rows[0]}"

    out = _python(
        """
        import luodi
        assert "numpy" in luodi.backend_names(), luodi.backend_names()
        backend = luodi.get_backend("numpy")
        avail = backend.available()
        assert avail.ok, avail
        print(type(backend).__module__)
        """,
        tmp_path,
    )
    assert out.strip() == "luodi_numpy_plugin"


def test_plugin_compiles_verifies_and_runs(plugin: Path, tmp_path: Path) -> None:
    out = _python(
        MLP
        + """
import json
import luodi

pkg = luodi.compile(mlp(), "mlp.luodi", targets=["numpy", "onnxruntime"])
entry = next(t for t in pkg.targets if t["backend"] == "numpy")
ver = entry["verification"]
x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
with luodi.Session("mlp.luodi", backend="numpy") as s_np, luodi.Session(
    "mlp.luodi", backend="onnxruntime"
) as s_ort:
    y_np, y_ort = s_np.run({"x": x})["y"], s_ort.run({"x": x})["y"]
    s_np.set_tensor("x", x)
    s_np.forward()
    y_verbs = s_np.get_tensor("y")
    backend = s_np.backend
print(json.dumps({
    "passed": ver["passed"],
    "max_abs": max(o["max_abs"] for o in ver["outputs"].values()),
    "shape": list(y_np.shape),
    "diff": float(np.abs(y_np - y_ort).max()),
    "close": bool(np.allclose(y_np, y_ort, atol=1e-5)),
    "verbs_equal": bool(np.array_equal(y_np, y_verbs)),
    "rows_sum_to_one": bool(np.allclose(y_np.sum(axis=1), 1.0, atol=1e-5)),
    "backend": backend,
}))
""",
        tmp_path,
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert r["passed"] is True
    assert r["max_abs"] < 1e-5
    assert r["shape"] == [4, 10]
    assert r["close"], f"numpy and onnxruntime differ by {r['diff']}"
    assert r["verbs_equal"]
    assert r["rows_sum_to_one"]
    assert r["backend"] == "numpy"


def test_plugin_rejects_an_unsupported_op(plugin: Path, tmp_path: Path) -> None:
    out = _python(
        """
        import json
        import os
        import luodi
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="stem_conv")],
            "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
            initializer=[helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        try:
            luodi.compile(model, "conv.luodi", targets=["numpy"])
        except luodi.UnsupportedOpError as exc:
            print(json.dumps({"error": str(exc), "written": os.path.exists("conv.luodi")}))
        """,
        tmp_path,
    )
    assert out.strip(), "compiling a Conv for numpy did not raise UnsupportedOpError"
    r = json.loads(out.strip().splitlines()[-1])
    for word in ("Conv", "stem_conv", "numpy"):
        assert word in r["error"], r["error"]
    assert r["written"] is False
    assert list(tmp_path.iterdir()) == []
