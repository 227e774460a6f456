"""Post-training quantisation: the float graph + calibrated ranges + an engine's policy -> a QDQ ONNX graph.

onnxruntime.quantization.quantize_static writes the graph (ranges handed over through its calibration cache, so
one calibration serves many quantisations); this module chooses its arguments and the nodes kept in float, and
adds the bias correction ORT lacks (bias.py: quantise, correct the float biases, quantise again).
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CompileError
from .bias import correct_biases
from .calibrate import Calibration
from .policy import QuantPolicy
from .rounding import round_weights

# onnxruntime's quant_pre_process, run in a child whose working directory is a temporary folder: when its symbolic
# shape inference gives up it saves a debug model ("sym_shape_infer_temp.onnx" and a 12 MB uuid-named .data file for
# YOLOv8n) into the working directory, i.e. the user's folder. Symbolic inference gives up on some graphs (YOLOv8's
# computed shapes); ONNX's own shape inference is then enough for the quantiser.
_PREPARE = """
import logging, sys
logging.disable(logging.ERROR)
from onnxruntime.quantization.shape_inference import quant_pre_process
try:
    quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=False)
except Exception:
    quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=True)
"""


def prepare(model: Any) -> Any:
    """The float graph as the quantiser wants it: onnxruntime's ``quant_pre_process`` (shape inference, constant
    folding, Pad folded into Conv), every node named. Without it a ``Clip`` whose bounds are ``Constant`` nodes is
    not recognised as a removable activation and the conv before it gets the conv's own wide range (measured on
    EfficientNet-Lite0: 24 dB SNR after the first ReLU6 instead of ~40, 53% top-1 agreement). It runs in a child
    process in a temporary folder (see _PREPARE), on a file (given a ModelProto, its fallback path loses the
    weights)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="luodi-ptq-") as tmp:
        out, source = Path(tmp) / "pre.onnx", Path(tmp) / "in.onnx"
        onnx.save_model(model, source)
        proc = subprocess.run(
            [sys.executable, "-c", _PREPARE, str(source), str(out)], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise CompileError(f"onnxruntime's quantisation pre-processing failed on the model: {why}")
        return named(onnx.load_model(out))


def named(model: Any) -> Any:
    """``model`` with every node named (``<op>_<index>`` where it had none): fallback and sensitivity
    address nodes by name. The caller's model is not changed."""
    import onnx

    if all(n.name for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return out


# Activations that an int8 engine fuses into the op before them (the QDQ quantiser removes them and gives that
# op's output the activation's range); a layer is the op and such an activation together.
FUSED_ACTIVATIONS = ("Relu", "Clip")


def layers(model: Any, policy: QuantPolicy) -> dict[str, list[str]]:
    """The quantisable layers in graph order: the name of each weighted or pooling node the policy runs in
    int8 -> that node and the activation fused after it. Quantising a Conv without its ReLU6 would give the
    Conv's output its own wide range and measure an error no engine makes."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in policy.ops or node.op_type in FUSED_ACTIVATIONS:
            continue
        group = [node.name]
        after = consumers.get(node.output[0], []) if node.output else []
        if len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS and after[0].op_type in policy.ops:
            group.append(after[0].name)
        out[node.name] = group
    return out


def quantizable_nodes(model: Any, policy: QuantPolicy) -> list[str]:
    """Names of the layers (see :func:`layers`) the policy runs in int8, in graph order."""
    return list(layers(model, policy))


def quantize(
    model: Any,
    calibration: Calibration,
    policy: QuantPolicy,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> Any:
    """The QDQ ``onnx.ModelProto`` of ``model`` for ``policy``; nodes in ``exclude`` stay float, and with
    ``only`` just those nodes are quantised (sensitivity analysis). With the policy's bias correction, the
    quantised layers' biases absorb the mean error of their rounded weights (bias.py)."""
    model = named(model)
    groups = layers(model, policy)
    exclude = [n for name in exclude for n in groups.get(name, [name])]
    if only is not None:
        only = [n for name in only for n in groups.get(name, [name])]
    args = policy.ort_arguments()
    qdq = _round(_quantize_static(model, calibration, policy, exclude, only, args), model, calibration, policy)
    if policy.bias_correction and calibration.input_means:
        # the bias does not enter the weights' scales, so the second pass rounds the weights the same way
        corrected, fixed = correct_biases(model, qdq, calibration.input_means)
        if fixed:
            qdq = _quantize_static(corrected, calibration, policy, exclude, only, args)
            qdq = _round(qdq, corrected, calibration, policy)
    return qdq


def _round(qdq: Any, model: Any, calibration: Calibration, policy: QuantPolicy) -> Any:
    """``qdq`` with GPTQ-rounded weights where the policy asks for them (same scales; see rounding.py)."""
    if policy.weight_rounding != "gptq" or not calibration.input_covariances:
        return qdq
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    w = policy.weights
    if not w.symmetric:
        return qdq  # asymmetric weights keep nearest rounding
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[w.dtype].tensor_type
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=w.bits == 7, symmetric=True)
    return round_weights(qdq, model, calibration.input_covariances, int(qmin), int(qmax), calibration.gptq_factors)[0]


def _quantize_static(
    model: Any,
    calibration: Calibration,
    policy: QuantPolicy,
    exclude: list[str],
    only: list[str] | None,
    args: dict[str, Any],
) -> Any:
    import onnx
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    with tempfile.TemporaryDirectory(prefix="luodi-ptq-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(calibration.ranges, cache)
        out = Path(tmp) / "model.qdq.onnx"
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" warning every time
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    model,
                    out,
                    calibration_data_reader=None,
                    calibration_cache_path=cache,
                    calibrate_method=calibration.ranges.calibration_method,
                    nodes_to_exclude=list(exclude),
                    nodes_to_quantize=list(only) if only is not None else None,
                    **args,
                )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CompileError(
                f"onnxruntime's quantiser could not quantise the model for {policy.backend}: {exc}"
            ) from exc
        finally:
            logging.getLogger().setLevel(quiet)
        return onnx.load_model(out)
