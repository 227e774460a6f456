"""The child side of MNN's conversion (_mnn_convert.py): convert with MNN's converter extension, then load and run
the result once, in a process of its own (MNN dies of some graphs); for mnn:int8, MNN's quantiser in between
(_mnn_quant.py). Started as
``python -c "from luodi.backends._mnn_child import main; main()" WORKDIR``.

Apart from _mnn_convert.py because it loads the result with the backend (mnn.py), which imports the converter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ._mnn_convert import MODEL_FILE, QUANTISED_FILE
from ._mnn_quant import CONFIG_FILE
from .contract import Artifact, LoadOptions
from .mnn import MnnBackend, _captured_output, _engine_said
from .probe import limit_memory


def main() -> None:
    """The child side of _convert_and_probe_in_child: argv[1] is the work folder."""
    work = Path(sys.argv[1])
    limit_memory()  # some graphs make MNN allocate without bound: a cap ends the child at once
    stage, result = work / "stage", work / "result.json"
    opts = json.loads((work / "job.json").read_text())
    src, dst = str(work / "model.onnx"), str(work / MODEL_FILE)
    stage.write_text("convert")
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", src, "--MNNModel", dst, "--bizCode", "luodi"]
    if opts["fp16_weights"]:
        argv.append("--fp16")
    import _tools  # MNN's converter extension; never MNN.tools (telemetry)

    try:
        _tools.mnnconvert(argv)
    except Exception as exc:  # the extension raises bare exceptions
        result.write_text(json.dumps({"status": "convert-failed", "error": str(exc)}))
        return
    sys.stdout.flush()
    if not os.path.exists(dst):
        result.write_text(json.dumps({"status": "convert-failed", "error": "the converter wrote no model"}))
        return
    if opts.get("quantise"):  # mnn:int8: MNN's own calibration on the samples in work/calib (_mnn_quant.py)
        stage.write_text("quantise")
        source, dst = dst, str(work / QUANTISED_FILE)
        try:
            _tools.mnnquant(["mnnquant", source, dst, str(work / CONFIG_FILE)])  # the C function, one argument list
        except Exception as exc:  # noqa: BLE001 - the extension raises bare exceptions
            result.write_text(json.dumps({"status": "quantise-failed", "error": str(exc)}))
            return
        sys.stdout.flush()
        if not os.path.exists(dst):
            result.write_text(json.dumps({"status": "quantise-failed", "error": "the quantiser wrote no model"}))
            return
    stage.write_text("load")
    backend = MnnBackend()
    artifact = Artifact(backend.name, "probe", {MODEL_FILE: Path(dst).read_bytes()}, opts)
    engine = backend.load(artifact, LoadOptions(threads=1))
    stage.write_text("run")
    error = None
    shapes = {name: tuple(shape) for name, shape in opts["trial_shapes"].items()}
    for fill in (1, 0):  # ones first: zeros are no valid integer divisor or "scales"; then zeros
        feeds = {s.name: np.full(shapes[s.name], fill, dtype=s.np_dtype) for s in engine.inputs}
        with _captured_output() as log:
            try:
                engine.run(feeds)
            except BackendError as exc:
                error = str(exc)
            else:
                error = None
        if error is None:
            break
        said = _engine_said(log[0] if log else "")
        if said and "MNN said" not in error:
            error = f"{error}; MNN said: {said}"
    engine.close()
    if dst != str(work / MODEL_FILE):
        os.replace(dst, work / MODEL_FILE)  # the model that ran is the one handed back
    status = {"status": "ok"} if error is None else {"status": "run-failed", "error": error}
    status["representative"] = bool(opts.get("representative"))
    result.write_text(json.dumps(status))
