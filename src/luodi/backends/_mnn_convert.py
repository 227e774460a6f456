"""ONNX -> .mnn with MNN's converter, and the converted model's first run, both in a child process.

MNN's converter is the ``_tools`` C extension, called directly: the ``mnnconvert`` command and ``MNN.tools`` send
usage telemetry and pip-install a logging SDK at import time, so nothing here imports them. MNN dies of
SIGSEGV/SIGFPE/SIGABRT on many graphs it cannot handle (about 50 of the first 1300 ONNX node test cases, converter
and kernels alike; OneHot allocated until the OOM killer came), so the conversion and a first run on ones (then
zeros) happen in a child whose address space is capped; a crash there is an UnsupportedOpError here. Pooling nodes
without ``strides`` get the ONNX default written out first (MNN reads it as 0, SIGFPE). Kept out of the backend
registry (a leading underscore): luodi.backends.mnn is the engine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import onnx_io
from ..errors import CompileError, UnsupportedOpError
from ..paths import child_env
from ..tensor import specs_from_onnx
from ._mnn_quant import CONFIG_FILE

MODEL_FILE = "model.mnn"
QUANTISED_FILE = "model.int8.mnn"
_NOT_SUPPORTED = re.compile(r"These Op Not Support:\s*(.*)")
_POOLS = {"MaxPool", "AveragePool", "LpPool"}


def convert(
    model: Any,
    job: dict[str, Any],
    calibrate: Callable[[Path], dict[str, Any]] | None = None,
    quantised: dict[str, Any] | None = None,
) -> bytes:
    """The .mnn bytes of ``model`` converted with ``job``'s settings (fp16_weights, trial_shapes, inputs, outputs...),
    proven to run once at ``job["trial_shapes"]``; UnsupportedOpError/CompileError saying why not. With
    ``calibrate`` (mnn:int8), it writes the calibration data into the work folder and returns the quantisation
    config (_mnn_quant.py), and the model is quantised between the conversion and the run; with luodi's ranges,
    ``quantised`` (when given) gets ``layers``, how many layers the compression-params file quantised."""
    with tempfile.TemporaryDirectory(prefix="luodi-mnn-") as tmp:
        onnx_io.save(_legalised(model), Path(tmp, "model.onnx"))  # + model.onnx.data over 2 GB
        if calibrate is not None:
            Path(tmp, CONFIG_FILE).write_text(json.dumps(calibrate(Path(tmp))))
            job = {**job, "quantise": True}
        Path(tmp, "job.json").write_text(json.dumps(job))
        data = _convert_and_probe_in_child(tmp, model)
        report = Path(tmp, "quantised.json")
        if quantised is not None and report.exists():
            quantised.update(json.loads(report.read_text()))
        return data


_CHILD_TIMEOUT_S = 300
_STAGES = {
    "convert": "converting the ONNX graph",
    "quantise": "quantising (MNN's converter with luodi's ranges, or its mnnquant library function)",
    "load": "loading the converted model",
    "run": "running the converted model once on zeros/ones",
}


def _convert_and_probe_in_child(workdir: str, model: Any) -> bytes:
    """Convert ``workdir/model.onnx`` and run it once, in a child process; the .mnn bytes.

    MNN dies of SIGSEGV/SIGFPE/SIGABRT (or allocates until the OOM killer comes) on a fair number of
    graphs it cannot handle, in the converter and in its kernels alike; in a child process that is
    an UnsupportedOpError for the caller instead of the end of the caller's process.
    """
    code = "from luodi.backends._mnn_child import main; main()"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, workdir],
            capture_output=True,
            env=child_env(),
            cwd=workdir,  # the converter drops scratch files (.__convert_external_data.bin) in the cwd
            timeout=_CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CompileError(f"mnn did not finish converting the model within {_CHILD_TIMEOUT_S} s") from None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    _raise_unsupported(text, model)
    stage_file = Path(workdir, "stage")
    stage = stage_file.read_text() if stage_file.exists() else "convert"
    doing = _STAGES.get(stage, stage)
    ops = sorted({n.op_type for n in model.graph.node})
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        hint = " (probably out of memory)" if sig == "SIGKILL" or "bad_alloc" in text else ""
        if stage == "quantise":  # the float model converted and ran: the quantiser itself died
            config = json.loads(Path(workdir, CONFIG_FILE).read_text())
            if config.get("ranges") == "luodi":
                raise CompileError(
                    f"mnn crashed with {sig}{hint} quantising with luodi's ranges (its converter given a "
                    "compression-params file; the float model converted): try compile option ranges=mnn"
                )
            method = config.get("feature_quantize_method")
            raise CompileError(
                f"mnn's quantiser crashed with {sig}{hint} calibrating with method {method} (the float model "
                "converted): try compile option method=EMA or KL (MNN's ADMM dies of heap corruption on some graphs)"
            )
        raise UnsupportedOpError(
            f"mnn crashed with {sig}{hint} while {doing}; the model's operators are {ops}; "
            "MNN cannot handle one of them here: try another target"
        )
    result_file = Path(workdir, "result.json")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if result.get("status") == "run-failed":
        shapes = json.loads(Path(workdir, "job.json").read_text()).get("trial_shapes", {})
        free = any(not isinstance(d, int) for s in specs_from_onnx(model)[0] for d in s.shape[1:])  # beyond batch
        hint = (
            "; the model has free dimensions: give shapes it really runs at (--input-shape NAME=1x3x224x224)"
            if free and not result.get("representative")
            else "; try another target"
        )
        raise UnsupportedOpError(
            f"mnn converted the model but cannot run it at input shapes {shapes} (on ones nor zeros): "
            f"{result.get('error')}; the model's operators are {ops}{hint}"
        )
    if proc.returncode != 0 or result.get("status") != "ok":
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
        detail = result.get("error") or tail or f"exit status {proc.returncode}"
        raise CompileError(f"mnn failed while {doing}: {detail}")
    return Path(workdir, MODEL_FILE).read_bytes()


def _legalised(model: Any) -> Any:
    """``model`` with the attribute defaults MNN's converter gets wrong written out explicitly.

    MNN 3.6.1 converts a MaxPool/AveragePool/LpPool without ``strides`` to stride 0 (ONNX's default
    is 1), and the CPU kernel then dies of SIGFPE, a division by zero that takes the process down.
    """
    from onnx import helper

    missing = [n for n in model.graph.node if n.op_type in _POOLS and not any(a.name == "strides" for a in n.attribute)]
    if not missing:
        return model
    fixed = type(model)()
    fixed.CopyFrom(model)
    for node in fixed.graph.node:
        if node.op_type in _POOLS and not any(a.name == "strides" for a in node.attribute):
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
            node.attribute.append(helper.make_attribute("strides", [1] * len(kernel)))
    return fixed


def _raise_unsupported(text: str, model: Any) -> None:
    """Turn the converter's "These Op Not Support: ONNX::Hardmax ..." line into UnsupportedOpError."""
    m = _NOT_SUPPORTED.search(text)
    if not m:
        return
    ops = [tok.split("::")[-1] for tok in m.group(1).split() if tok.strip(",")]
    ops = [o.strip(",") for o in ops]
    where = []
    for op in ops:
        nodes = [n.name or f"#{i}" for i, n in enumerate(model.graph.node) if n.op_type == op]
        where.append(f"{op} at node(s) {', '.join(repr(n) for n in nodes[:5])}" if nodes else op)
    raise UnsupportedOpError(
        f"mnn cannot run operator(s) {'; '.join(where)}; try another target or replace the operator before export"
    )
