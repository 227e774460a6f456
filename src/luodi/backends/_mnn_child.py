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
from typing import Any

import numpy as np

from ..errors import BackendError
from ._mnn_convert import MODEL_FILE, QUANTISED_FILE
from ._mnn_quant import (
    COMPRESSION_FILE,
    CONFIG_FILE,
    SAMPLES_FILE,
    asymmetric_tensors,
    compression_params,
    conv_layers,
    measure_scales,
    quantised_layers,
)
from .contract import Artifact, LoadOptions
from .mnn import MnnBackend, _captured_output, _engine_said, _import_mnn
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
        config = json.loads((work / CONFIG_FILE).read_text())
        try:
            if config.get("ranges") == "luodi":
                layers = _quantise_with_luodi_ranges(_tools, work, source, dst, config)
                (work / "quantised.json").write_text(json.dumps({"layers": layers}))
            else:  # MNN's quantiser: the C function, one argument list
                _tools.mnnquant(["mnnquant", source, dst, str(work / CONFIG_FILE)])
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


def _quantise_with_luodi_ranges(tools: Any, work: Path, source: str, dst: str, config: dict[str, Any]) -> int:
    """Ranges "luodi" (_mnn_quant.py): the float model's layers from MNN's JSON dump, their tensors' scales measured
    by running it on the samples, then MNN's converter again, .mnn to .mnn, with the compression-params file.
    Returns how many layers the int8 model has quantised with the file's scales; a ValueError when none."""
    dump = work / "float.json"
    tools.mnnconvert(["mnnconvert", "-f", "MNN", "--modelFile", source, "--JsonFile", str(dump)])
    layers = conv_layers(json.loads(dump.read_text()))
    dump.unlink()
    if not layers:
        raise ValueError("the model has no convolution or Gemm MNN quantises")
    tensors = sorted({t for layer in layers for t in (layer["input"], layer["output"])})
    samples = np.load(work / SAMPLES_FILE)
    MNN, nn, F = _import_mnn()
    runtime = nn.create_runtime_manager(({"backend": "CPU", "precision": "high", "numThread": 1},))
    module = nn.load_module_from_file(source, [config["input"]], tensors, runtime_manager=runtime, shape_mutable=True)

    def run(x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        outs = module.forward([F.const(x, x.shape, F.NCHW, F.float)])
        if len(outs) != len(tensors):
            raise ValueError(f"MNN's float model gave {len(outs)} of the {len(tensors)} tensors to calibrate")
        return [np.array((F.convert(v, F.NCHW) if v.data_format == F.NC4HW4 else v).read()) for v in outs]

    asymmetric = set() if config.get("symmetric", True) else asymmetric_tensors(layers)
    scales = measure_scales(run, samples, tensors, asymmetric)
    params = compression_params(layers, scales, str(MNN.version()), asymmetric)
    (work / COMPRESSION_FILE).write_text(json.dumps(params))
    argv = ["mnnconvert", "-f", "MNN", "--modelFile", source, "--MNNModel", dst, "--bizCode", "luodi"]
    tools.mnnconvert([*argv, "--compressionParamsFile", str(work / COMPRESSION_FILE)])
    # what the converter made of the file: it skips a layer it cannot match without a word
    tools.mnnconvert(["mnnconvert", "-f", "MNN", "--modelFile", dst, "--JsonFile", str(dump)])
    done = quantised_layers(json.loads(dump.read_text()))
    dump.unlink()
    if not done:
        raise ValueError(f"MNN's converter quantised none of the {len(layers)} layers of the compression-params file")
    return done
