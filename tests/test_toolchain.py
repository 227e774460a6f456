"""Vendor toolchains in their own environments (luodi.toolchain) and the bare worker child that drives them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import luodi
from luodi import toolchain as tc
from luodi.cli.main import cli
from luodi.worker import Worker

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="worker processes need Linux memfd")

BARE_MODULES = ["luodi", "luodi.worker", "luodi.worker.child", "luodi.worker.wire"]


def test_a_bare_child_runs_no_package_init_and_carries_arrays() -> None:
    """A bare child registers luodi and luodi.worker as empty packages: only the child loop and the wire load."""
    with Worker("luodi.worker.child:echo", python=sys.executable, bare=True, label="bare") as w:
        assert w.info["luodi_modules"] == BARE_MODULES
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        header, out = w.call("echo", {}, {"x": x})
        np.testing.assert_array_equal(out["x"], x)
        assert header["luodi_modules"] == BARE_MODULES  # still nothing more after a call


def test_a_normal_child_imports_luodi_itself() -> None:
    """The contrast that makes the test above able to fail: without bare, luodi/__init__.py runs in the child."""
    with Worker("luodi.worker.child:echo", label="plain") as w:
        assert "luodi.session" in w.info["luodi_modules"]


def test_a_bare_child_that_dies_in_a_call_is_a_backend_error_and_the_caller_lives() -> None:
    with Worker("luodi.worker.child:echo", python=sys.executable, bare=True, auto_restart=False, label="tc") as w:
        with pytest.raises(luodi.EngineCrashedError, match="exited with code 7"):
            w.call("exit", {"code": 7})
        assert not w.alive


def test_a_missing_toolchain_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUODI_TOOLCHAINS_DIR", str(tmp_path))
    assert tc.status("rknn").state == "missing"
    with pytest.raises(luodi.BackendUnavailableError, match="luodi toolchain install rknn"):
        tc.python_for("rknn", "rknn")


def test_a_half_install_or_an_old_spec_is_reported_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUODI_TOOLCHAINS_DIR", str(tmp_path))
    (tmp_path / "rknn" / "bin").mkdir(parents=True)
    (tmp_path / "rknn" / "bin" / "python").symlink_to(sys.executable)
    assert tc.status("rknn").state == "broken"  # no marker: an install that died half-way
    with pytest.raises(luodi.BackendUnavailableError, match="broken.*luodi toolchain install rknn"):
        tc.python_for("rknn", "rknn")
    (tmp_path / "rknn" / tc.MARKER).write_text(json.dumps({"spec": "0" * 16}))
    assert tc.status("rknn").state == "stale"
    (tmp_path / "rknn" / tc.MARKER).write_text(json.dumps({"spec": tc.spec("rknn").digest()}))
    assert tc.status("rknn").ok and tc.python_for("rknn", "rknn") == str(tmp_path / "rknn" / "bin" / "python")
    assert tc.remove("rknn") and tc.status("rknn").state == "missing" and not tc.remove("rknn")


def test_unknown_toolchain_is_an_input_error() -> None:
    with pytest.raises(luodi.InputError, match="known toolchains: onnx2tf, rknn"):
        tc.spec("tensorrt")
    result = CliRunner().invoke(cli, ["toolchain", "install", "tensorrt"])
    assert result.exit_code == 2 and "no toolchain named 'tensorrt'" in result.output


def test_toolchain_list_shows_state_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUODI_TOOLCHAINS_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["toolchain", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "rknn" in result.output and "missing" in result.output and "luodi toolchain install rknn" in result.output


def test_the_installed_rknn_toolchain_runs_a_bare_child_without_luodi_dependencies() -> None:
    """The real toolchain environment (what `make test` installs) has no rich/click and numpy 1.26: the bare child
    starts there all the same, and the install is a quick no-op the second time."""
    if not tc.status("rknn").ok:
        pytest.skip("the rknn toolchain is not installed here (luodi toolchain install rknn)")
    st = tc.install("rknn")
    assert st.ok and (st.path / tc.MARKER).is_file()
    py = tc.python_for("rknn", "rknn")
    with Worker("luodi.worker.child:echo", python=py, bare=True, label="rknn toolchain") as w:
        assert w.info["prefix"] == str(st.path) and w.info["luodi_modules"] == BARE_MODULES
        _, out = w.call("echo", {}, {"x": np.ones(3, np.int8)})
        assert out["x"].dtype == np.int8
