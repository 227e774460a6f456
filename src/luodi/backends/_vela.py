"""Arm Vela (ethos-u-vela): a full-int8 .tflite compiled for an Ethos-U NPU configuration, read back as an estimate.

Vela's output is a .tflite whose NPU part is one custom operator that only the device runs, so it is not a runnable
target here: what luodi keeps is Vela's performance estimate (inference time and cycles at the configuration's clock,
SRAM and flash use) and the operator placement (how many of the model's operators run on the NPU, which types fall
back to the CPU and Vela's reason). Vela runs in a child process with a time limit; its failure is a BackendError.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BackendError, BackendUnavailableError, CompileError

INSTALL = "pip install 'luodi[vela]'"
# ethos-u-vela 5.2's --accelerator-config choices
CONFIGS = (
    "ethos-u55-32",
    "ethos-u55-64",
    "ethos-u55-128",
    "ethos-u55-256",
    "ethos-u65-256",
    "ethos-u65-512",
    "ethos-u85-128",
    "ethos-u85-256",
    "ethos-u85-512",
    "ethos-u85-1024",
    "ethos-u85-2048",
)
TIMEOUT_S = 600


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ethos-u-vela")
    except PackageNotFoundError:
        return ""


def check(config: str) -> None:
    """A CompileError for a configuration Vela does not have, a BackendUnavailableError when Vela is missing."""
    if config not in CONFIGS:
        raise CompileError(
            f"--estimate takes a Vela accelerator configuration, one of {', '.join(CONFIGS)}; not '{config}'"
        )
    if not version():
        raise BackendUnavailableError(f"--estimate {config} runs Arm's Vela, which is not installed: {INSTALL}")


def estimate(tflite: bytes, config: str) -> dict[str, Any]:
    """Vela's estimate for ``tflite`` (a full-int8 model) on ``config``: inference_ms, cycles, sram_kib, flash_kib,
    npu_ops and cpu_ops (the model's operators by where they run), cpu_fallback (the operator types left to the
    CPU) with Vela's reasons, and the system configuration and memory mode Vela assumed."""
    check(config)
    with tempfile.TemporaryDirectory(prefix="luodi-vela-") as tmp:
        model = Path(tmp) / "model.tflite"
        model.write_bytes(tflite)
        out = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from ethosu.vela.vela import main; sys.exit(main())",
            str(model),
            "--accelerator-config",
            config,
            "--output-dir",
            str(out),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise BackendError(f"Vela did not finish within {TIMEOUT_S} s on {config}") from None
        if done.returncode != 0:
            lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or [f"exit status {done.returncode}"]
            raise BackendError(f"Vela failed on {config}: {lines[-1][:400]}")
        summaries = sorted(out.glob("model_summary_*.csv"))
        compiled = out / "model_vela.tflite"
        if not summaries or not compiled.exists():
            raise BackendError(f"Vela wrote no summary for {config} (it printed: {done.stdout.strip()[-300:]})")
        with summaries[0].open(newline="") as f:
            row = next(csv.DictReader(f))
        ops = _count(done.stdout)
        flash = float(row.get("off_chip_flash_memory_used") or 0) + float(row.get("on_chip_flash_memory_used") or 0)
        return {
            "inference_ms": round(float(row["inference_time"]) * 1e3, 4),
            "cycles": int(float(row["cycles_total"])),
            "sram_kib": round(float(row["sram_memory_used"]), 2),
            "flash_kib": round(flash, 2),
            "npu_ops": ops.get("NPU", 0),
            "cpu_ops": ops.get("CPU", 0),
            "cpu_fallback": _cpu_ops(compiled.read_bytes()),
            "reasons": _reasons(done.stdout),
            "system_config": row.get("system_config", ""),
            "memory_mode": row.get("memory_mode", ""),
            "clock_mhz": round(float(row.get("core_clock") or 0) / 1e6, 1),
            "vela": version(),
        }


def _count(stdout: str) -> dict[str, int]:
    """The summary's ``CPU operators = N (x%)`` and ``NPU operators = N (x%)``."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(CPU|NPU) operators = (\d+)", stdout, re.M)}


def _reasons(stdout: str) -> dict[str, str]:
    """Vela's reason per operator type it would not put on the NPU (its ``Warning (supported operators)`` lines)."""
    reasons: dict[str, str] = {}
    op = None
    for line in stdout.splitlines():
        m = re.match(r"Warning \(supported operators\) operator: (\w+)", line)
        if m:
            op = m.group(1)
        elif op and line.startswith("Reason:"):
            reasons.setdefault(op, line.split(":", 1)[1].strip()[:300])
            op = None
    return reasons


def _cpu_ops(compiled: bytes) -> list[str]:
    """The operator types of Vela's output that are not its NPU custom operator: what the device's CPU runs."""
    from ethosu.vela.tflite.BuiltinOperator import BuiltinOperator
    from ethosu.vela.tflite.Model import Model

    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    model = Model.GetRootAsModel(compiled, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        c = model.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
        custom = c.CustomCode()
        codes.append(None if custom == b"ethos-u" else (custom.decode() if custom else names.get(code, str(code))))
    found: set[str] = set()
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        for j in range(sub.OperatorsLength()):
            name = codes[sub.Operators(j).OpcodeIndex()]
            if name:
                found.add(name)
    return sorted(found)
