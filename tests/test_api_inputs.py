"""Wrong arguments to the public API and the CLI are LuodiErrors or usage errors naming the value; engines write
no telemetry files. Real engines, real packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import luodi
from conftest import installed, small_cnn

X = np.zeros((1, 3, 16, 16), np.float32)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return luodi.compile(small_cnn(), tmp_path_factory.mktemp("api") / "cnn.luodi", verify=False).path


def test_run_takes_one_array_for_a_one_input_model_and_says_what_it_takes_otherwise(pkg):
    with luodi.Session(pkg) as s:
        np.testing.assert_array_equal(s.run(X)["y"], s.run({"x": X})["y"])
        for bad in ([X], None, "x", 3):
            with pytest.raises(luodi.InputError, match="dict of input name -> array"):
                s.run(bad)
        with pytest.raises(luodi.InputError, match="run_batch|samples"):
            s.run_batch(None)
        with pytest.raises(luodi.InputError, match="shapes must be a dict"):
            s.prepare("x")


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"threads": "4"}, "threads"),
        ({"threads": -1}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"device": 1}, "device"),
        ({"backend": ["onnxruntime"]}, "backend"),
        ({"options": 1}, "options"),
        ({"precision": 16}, "precision"),
        ({"trust": 123}, "public key"),
    ],
)
def test_session_arguments_of_the_wrong_type_are_input_errors(pkg, kwargs, names):
    with pytest.raises(luodi.LuodiError, match=names):
        luodi.Session(pkg, **kwargs)


def test_compile_takes_one_target_as_a_string_and_names_bad_arguments(tmp_path):
    one = luodi.compile(small_cnn(), tmp_path / "one.luodi", targets="onnxruntime", verify=False)
    assert [t["backend"] for t in one.targets] == ["onnxruntime"]
    bad = [
        ({"targets": [1]}, "targets"),
        ({"targets": None}, "targets"),
        ({"passes": 1}, "passes"),
        ({"samples": [1]}, "samples"),
        ({"samples": X}, "samples"),
    ]
    for kwargs, names in bad:
        with pytest.raises(luodi.InputError, match=names):
            luodi.compile(small_cnn(), tmp_path / "bad.luodi", verify=False, **kwargs)
    with pytest.raises(luodi.InputError, match="output"):
        luodi.compile(small_cnn(), None, verify=False)
    with pytest.raises(luodi.PackageError, match="path"):
        luodi.Package(None)
    assert not (tmp_path / "bad.luodi").exists()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_numbers_out_of_range_are_usage_errors(pkg, tmp_path):
    image = Path(luodi.__file__).parent / "zoo" / "data" / "chelsea.jpg"
    cases = [
        (["predict", str(pkg), str(image), "-k", "-3"], "-3"),
        (["serve", "--repository", str(tmp_path), "--port", "80000"], "80000"),
        (["serve", "--repository", str(tmp_path), "--threads", "0"], "0"),
        (["verify", str(pkg), "--limit", "0"], "0"),
    ]
    for args, value in cases:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "Invalid value" in done.stderr and value in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.skipif(not (installed("onnxruntime") and installed("openvino")), reason="needs onnxruntime and openvino")
def test_engines_write_no_telemetry_under_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import numpy as np, luodi\n"
        "from conftest import small_cnn\n"
        f"p = luodi.compile(small_cnn(), {str(tmp_path / 't.luodi')!r}, targets=['onnxruntime', 'openvino'])\n"
        "for b in ('onnxruntime', 'openvino'):\n"
        "    with luodi.Session(p.path, backend=b) as s:\n"
        "        s.run({'x': np.zeros((1, 3, 16, 16), np.float32)})\n"
        "print('ran')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "LUODI_ENGINE_TELEMETRY")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), LUODI_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert "ran" in done.stdout, done.stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"engines wrote under $HOME: {written}"


def test_topk_takes_a_positive_k_only():
    from luodi.pipeline.classify import TopK

    scores = np.random.default_rng(0).random((1, 1000)).astype(np.float32)
    assert len(TopK(k=5)(scores)[0]) == 5 and len(TopK(k=5)(scores, k=3)[0]) == 3
    for k in (-3, 0, "3", 2.5):
        with pytest.raises(luodi.PipelineError, match="k must be an int >= 1"):
            TopK(k=5)(scores, k=k)
        with pytest.raises(luodi.PipelineError, match="k must be an int >= 1"):
            TopK(k=k)
