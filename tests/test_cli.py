"""The `luodi` command, run as a user runs it (a real subprocess), on real packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

import luodi
from luodi.zoo.images import skimage_picture


def luodi_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luodi", *args], capture_output=True, text=True, timeout=300)


def test_backends_lists_builtins_with_availability():
    r = luodi_cli("backends")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│")}
    assert "yes" in lines["onnxruntime"] and "yes" in lines["reference"]


def test_compile_info_and_errors(tmp_path, cnn_model):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(cnn_model.SerializeToString())
    out = tmp_path / "cnn.luodi"
    r = luodi_cli("compile", str(model), "-o", str(out), "--target", "onnxruntime", "--target", "reference")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│ ") and line.split()[1] != "│"}
    assert "pass" in rows["onnxruntime:fp32"].split("│")[8], r.stdout  # the result column of that target's row
    assert "FAIL" not in r.stdout and "the reference" in rows["reference:fp32"]
    targets = {(t["backend"], t["precision"]): t for t in luodi.Package.open(out).targets}
    assert targets["onnxruntime", "fp32"]["status"] == "verified"
    assert targets["onnxruntime", "fp32"]["verification"]["passed"] is True
    r = luodi_cli("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "[batch, 3, 16, 16]" in r.stdout and "reference:fp32" in r.stdout
    bad = tmp_path / "bad.luodi"
    bad.write_bytes(b"garbage" * 100)
    r = luodi_cli("info", str(bad))
    assert r.returncode == 2 and "not a luodi package" in r.stderr and "Traceback" not in r.stderr
    r = luodi_cli("compile", str(model), "-o", str(tmp_path / "y.luodi"), "--target", "nosuch")
    assert r.returncode == 2 and "no backend named 'nosuch'" in r.stderr
    assert not (tmp_path / "y.luodi").exists()


@pytest.mark.slow
def test_predict_prints_top_labels(effnet_package):
    r = luodi_cli("predict", str(effnet_package), str(skimage_picture("coffee")), "-k", "3")
    assert r.returncode == 0, r.stderr
    assert "espresso" in r.stdout and "%" in r.stdout


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (("predict",), "Missing argument 'PACKAGE'"),
        (("info",), "Missing argument 'PACKAGE'"),
        (("compile", "x.onnx"), "Missing option '-o' / '--output'"),
    ],
)
def test_usage_errors_exit_nonzero(args, missing):
    r = luodi_cli(*args)
    # click's usage error: exit status 2, the usage line and what is missing, never a traceback
    assert r.returncode == 2, r.stderr
    assert f"Usage: luodi {args[0]}" in r.stderr and missing in r.stderr and "Traceback" not in r.stderr
