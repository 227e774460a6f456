"""The backend template: Backend.compile/load and Engine.run do the common checks once and call _compile/_load/_run.

Real engines (onnxruntime, the reference evaluator) and small real backends written here, old style and new.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import luodi
from conftest import small_cnn
from luodi.backends import Artifact, CompileOptions, LoadOptions, get_backend, open_engine, run_once
from luodi.backends.base import Backend, Engine
from luodi.errors import BackendError, CompileError, MissingInputError, OptionError, StateError, UnknownTensorError

SRC = Path(luodi.__file__).parent
X = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def ort_artifact() -> Artifact:
    return get_backend("onnxruntime").compile(small_cnn(), CompileOptions())


# -- options typed and validated --------------------------------------------------------------------------------
def test_a_misspelt_session_option_is_an_error_naming_the_known_ones(cnn_package: Path) -> None:
    with pytest.raises(OptionError, match=r"no load option 'tensorrrt'.*tensorrt \(bool\)"):
        luodi.Session(cnn_package, backend="onnxruntime", options={"tensorrrt": True})


def test_an_option_of_the_wrong_type_is_an_error_saying_the_type(ort_artifact: Artifact) -> None:
    with pytest.raises(OptionError, match=r"'tensorrt' must be bool, got str"):
        get_backend("onnxruntime").load(ort_artifact, LoadOptions(extra={"tensorrt": "yes"}))


def test_a_misspelt_compile_option_is_an_error() -> None:
    with pytest.raises(OptionError, match=r"ncnn.*no compile option 'pnnx_timout'.*pnnx_timeout"):
        get_backend("ncnn").compile(small_cnn(), CompileOptions(extra={"pnnx_timout": 5}))
    with pytest.raises(OptionError, match=r"onnxruntime.*no compile option 'opt'.*none"):
        get_backend("onnxruntime").compile(small_cnn(), CompileOptions(extra={"opt": 1}))


def test_an_isolated_session_refuses_a_misspelt_option_before_starting_a_worker(cnn_package: Path) -> None:
    with pytest.raises(OptionError, match="tensorrrt"):
        luodi.Session(cnn_package, backend="onnxruntime", options={"tensorrrt": True}, isolate=True)


# -- Engine.run: the common checks, and Engine as a context manager ---------------------------------------------
def test_engine_is_a_context_manager_and_refuses_a_run_after_close(ort_artifact: Artifact) -> None:
    with get_backend("onnxruntime").load(ort_artifact, LoadOptions()) as engine:
        assert engine.backend == "onnxruntime"
        assert engine.run({"x": X})["y"].shape == (2, 5)
    with pytest.raises(StateError, match="onnxruntime engine is closed"):
        engine.run({"x": X})


def test_engine_run_names_a_missing_and_an_unknown_input(ort_artifact: Artifact) -> None:
    with open_engine("onnxruntime", ort_artifact) as engine:
        with pytest.raises(MissingInputError, match=r"\['x'\]"):
            engine.run({})
        with pytest.raises(UnknownTensorError, match=r"no input\(s\) \['z'\]"):
            engine.run({"x": X, "z": X})


def test_an_engines_own_exception_is_a_backend_error_naming_the_backend_and_shapes() -> None:
    # the reference evaluator's numpy error at a shape the graph cannot take (channels 4, weights for 3)
    with open_engine("reference", small_cnn()) as engine, pytest.raises(BackendError, match=r"\[1, 4, 16, 16\]"):
        engine.run({"x": np.ones((1, 4, 16, 16), np.float32)})


# -- the template for new backends and old ones ----------------------------------------------------------------
class _Doubling(Engine):
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds["x"].size == 0:
            raise ValueError("empty")
        return {"y": feeds["x"] * 2}


class NewStyle(Backend):
    """Implements only _compile/_load: precision, options, names and errors come from the base class."""

    name = "new-style"
    load_options = {"scale": luodi.backends.base.Option(float, "a scale")}

    def _compile(self, model: Any, options: CompileOptions) -> Artifact:
        return Artifact(self.name, options.precision, {"m": b""})

    def _load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        spec = luodi.TensorSpec("x", "float32", ("n",))
        return _Doubling([spec], [luodi.TensorSpec("y", "float32", ("n",))])


class OldStyle(Backend):
    """Written before the template: overrides compile/load and Engine.run, and checks nothing itself."""

    name = "old-style"

    def compile(self, model: Any, options: CompileOptions) -> Artifact:
        return Artifact(self.name, options.precision, {"m": b""})

    def load(self, artifact: Artifact, options: LoadOptions) -> Engine:
        class Old(Engine):
            def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return {"y": feeds["x"] + 1}

        return Old([luodi.TensorSpec("x", "float32", ("n",))], [luodi.TensorSpec("y", "float32", ("n",))])


@pytest.mark.parametrize("cls", [NewStyle, OldStyle])
def test_the_base_class_checks_precision_options_and_names_for_every_backend(cls: type[Backend]) -> None:
    backend = cls()
    with pytest.raises(CompileError, match=rf"{cls.name} has no precision 'int8'; choose one of \['fp32'\]"):
        backend.compile(None, CompileOptions(precision="int8"))
    with pytest.raises(OptionError, match="no load option 'scal'"):
        backend.load(backend.compile(None, CompileOptions()), LoadOptions(extra={"scal": 2.0}))
    engine = backend.load(backend.compile(None, CompileOptions()), LoadOptions())
    assert engine.backend == cls.name
    assert engine.run({"x": np.ones(3, np.float32)})["y"].shape == (3,)
    with pytest.raises(MissingInputError):
        engine.run({})
    engine.close()
    with pytest.raises(StateError):
        engine.run({"x": np.ones(3, np.float32)})


def test_a_new_style_engines_exception_becomes_a_backend_error() -> None:
    engine = NewStyle().load(Artifact("new-style", "fp32"), LoadOptions(extra={"scale": 1.0}))
    with pytest.raises(BackendError, match=r"new-style failed to run the model on inputs \{'x': \[0\]\}: empty"):
        engine.run({"x": np.ones(0, np.float32)})


# -- one load -> run -> close helper ----------------------------------------------------------------------------
def test_run_once_compiles_loads_runs_and_matches_a_session(cnn_package: Path) -> None:
    got = run_once("onnxruntime", small_cnn(), [{"x": X}, {"x": X[:1]}])
    with luodi.Session(cnn_package, backend="onnxruntime") as s:
        want = s.run({"x": X})["y"]
    assert [g["y"].shape for g in got] == [(2, 5), (1, 5)]
    np.testing.assert_allclose(got[0]["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1]["y"], want[:1], rtol=1e-5, atol=1e-5)


# -- the registry and the layers --------------------------------------------------------------------------------
def test_only_backends_are_listed_as_backends() -> None:
    assert set(luodi.backend_names()) >= {"onnxruntime", "reference"}
    helpers = ("base", "contract", "probe", "shapes", "onnx_compat", "_pnnx", "_mnn_convert", "_mnn_quant", "_int8")
    helpers += ("_probe_child", "_ncnn_int8", "_unfold")
    for helper in helpers:
        assert helper not in luodi.backend_names()


_ABOVE = (
    *("compiler", "selection", "timing", "session", "serve", "cli"),
    *("frontends", "zoo", "quant", "verify", "pipeline", "isolation"),
)


def _imports_of(path: Path) -> list[str]:
    """Every luodi module ``path`` imports (absolute names), at any depth of the file."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "luodi"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "luodi":  # `from .. import x`: x is a module of luodi, or the package root's own name
                found += [
                    f"luodi.{a.name}" if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file() else "luodi"
                    for a in node.names
                ]
            elif module.split(".")[0] == "luodi":
                found.append(module)
    return found


@pytest.mark.parametrize("layer", ["backends", "worker"])
def test_backends_and_worker_import_nothing_above_them(layer: str) -> None:
    """backends/ and worker/ sit below the compiler, selection, session, serve and cli, and the package root."""
    bad = []
    for path in sorted((SRC / layer).glob("*.py")):
        for module in _imports_of(path):
            if module == "luodi" or module.split(".")[1] in _ABOVE:
                bad.append(f"{path.name} imports {module}")
    assert bad == []
