"""ncnn's text ``.param`` format: the layers pnnx wrote, and refusing a package's .param that ncnn would misread.

ncnn trusts its files: a changed layer parameter can make it read or write out of bounds (a segfault, not an error).
What can be checked from the text is checked here, before ncnn reads a byte; the probe (luodi.backends.probe)
proves the rest in a child process. Runs no engine code.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import CompileError, ModelError

NO_BATCH = 233  # pnnx's and ncnn's "this tensor has no batch axis": the whole array is one Mat


def parse_param(text: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(type, name, bottoms, tops) per layer of an ncnn text .param."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != ["7767517"]:
        raise CompileError("pnnx wrote an ncnn .param without the 7767517 magic; it is not a usable ncnn model")
    layers = []
    for parts in lines[2:]:
        ltype, lname, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        layers.append((ltype, lname, parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]))
    return layers


_MAX_PARAM_ID = 32  # ncnn's NCNN_MAX_PARAM_COUNT: ids 0..31, arrays as -23300 - id
_ARRAY_BASE = -23300
_MAX_COUNT = 1 << 20  # layers, blobs, a layer's bottoms/tops, an array's length
_INT32 = 1 << 31
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|nan|inf)$", re.IGNORECASE)
# Layers whose weights pnnx writes with a 4-byte storage tag, then at least 2 bytes (fp16) per weight:
# type -> (the param id of the weight count, of num_output, of bias_term). Enough for a lower bound on model.bin.
_WEIGHTED = {
    "Convolution": (6, 0, 5),
    "ConvolutionDepthWise": (6, 0, 5),
    "Deconvolution": (6, 0, 5),
    "DeconvolutionDepthWise": (6, 0, 5),
    "Convolution1D": (6, 0, 5),
    "Convolution3D": (6, 0, 5),
    "InnerProduct": (2, 0, 1),
}
# Convolution*/Deconvolution*: 19=1 takes the weights from a second input blob (pnnx, for ONNX weights as inputs)
_DYNAMIC_WEIGHT = 19
# Parameters that ncnn divides by, allocates with or loops over, which must be >= 1 (id -> default).
_POSITIVE = {
    "Convolution": {0: None, 1: None, 2: 1, 3: 1, 6: None},
    "ConvolutionDepthWise": {0: None, 1: None, 2: 1, 3: 1, 6: None, 7: 1},
    "InnerProduct": {0: None, 2: None},
}


def _number(token: str, where: str) -> float | int:
    if not _NUMBER.match(token):
        raise ModelError(f"{where}: '{token[:40]}' is not a number")
    if any(c in token for c in ".eEnN"):  # ncnn reads a value with a dot or an exponent as a float
        return float(token)
    value = int(token)
    if not -_INT32 <= value < _INT32:
        raise ModelError(f"{where}: {value} does not fit ncnn's 32-bit integers")
    return value


def _layer_params(tokens: list[str], where: str) -> dict[int, Any]:
    params: dict[int, Any] = {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq or not re.fullmatch(r"-?\d+", key):
            raise ModelError(f"{where}: parameter '{tok[:40]}' is not id=value")
        pid = int(key)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            # A string parameter (ncnn reads it verbatim), e.g. Reshape's shape expression 6="0w,120" from pnnx.
            index, parsed = pid, value[1:-1]
            if len(parsed) > 255 or "\0" in parsed or '"' in parsed:  # ncnn reads at most 255 characters
                raise ModelError(f"{where}: parameter {pid} is a malformed string")
        elif pid <= _ARRAY_BASE:
            index = _ARRAY_BASE - pid
            items = value.split(",")
            count = _number(items[0], f"{where} parameter {pid}")
            if not isinstance(count, int) or count != len(items) - 1 or count > _MAX_COUNT:
                raise ModelError(f"{where}: array parameter {pid} declares {items[0]} values and has {len(items) - 1}")
            parsed: Any = [_number(v, f"{where} parameter {pid}") for v in items[1:]]
        else:
            index = pid
            parsed = _number(value, f"{where} parameter {pid}")
        if not 0 <= index < _MAX_PARAM_ID:
            raise ModelError(f"{where}: parameter id {pid} is outside ncnn's 0..{_MAX_PARAM_ID - 1}")
        if index in params:
            raise ModelError(f"{where}: parameter {index} is given twice")
        params[index] = parsed
    return params


def validate_param(ncnn: Any, param: bytes, bin_size: int) -> None:
    """Refuse a .param that ncnn would misread: structure, blob graph, layer types, parameter ids and values.

    ncnn trusts its files: a changed layer parameter can make it read or write out of bounds (a segfault, not
    an error). What can be checked from the text is checked here; the probe (luodi.backends.probe) proves the rest.
    """
    try:
        text = param.decode("ascii")
    except UnicodeDecodeError:
        raise ModelError("the ncnn target's model.param is not ASCII text; recompile the package") from None
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != ["7767517"]:
        raise ModelError("the ncnn target's model.param does not start with ncnn's magic 7767517; recompile it")
    if len(lines[1]) != 2 or not all(t.isdigit() for t in lines[1]):
        raise ModelError("the ncnn target's model.param line 2 must be '<layer count> <blob count>'")
    layer_count, blob_count = int(lines[1][0]), int(lines[1][1])
    if not 0 < layer_count <= _MAX_COUNT or not 0 < blob_count <= _MAX_COUNT or layer_count != len(lines) - 2:
        raise ModelError(
            f"the ncnn target's model.param declares {lines[1][0]} layers and {lines[1][1]} blobs "
            f"and has {len(lines) - 2} layer lines; recompile the package"
        )
    produced: set[str] = set()
    min_weights = 0
    for number, parts in enumerate(lines[2:], start=1):
        where = f"model.param layer {number}"
        if len(parts) < 4 or not parts[2].isdigit() or not parts[3].isdigit():
            raise ModelError(f"{where}: expected '<type> <name> <bottoms> <tops> ...'")
        ltype, nb, nt = parts[0], int(parts[2]), int(parts[3])
        where = f"model.param layer {number} ({ltype} '{parts[1][:40]}')"
        if nb > _MAX_COUNT or nt > _MAX_COUNT or len(parts) < 4 + nb + nt:
            raise ModelError(f"{where}: declares {nb} inputs and {nt} outputs but names fewer blobs")
        if ncnn.layer_to_index(ltype) < 0:
            raise ModelError(f"{where}: ncnn has no layer type '{ltype[:40]}'")
        bottoms, tops = parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]
        missing = [b for b in bottoms if b not in produced]
        if missing:
            raise ModelError(f"{where}: reads blob(s) {missing[:5]} that no earlier layer produces")
        again = [t for t in tops if t in produced] + [t for i, t in enumerate(tops) if t in tops[:i]]
        if again:
            raise ModelError(f"{where}: produces blob(s) {again[:5]} that already exist")
        produced.update(tops)
        params = _layer_params(parts[4 + nb + nt :], where)
        for pid, default in _POSITIVE.get(ltype, {}).items():
            value = params.get(pid, default)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ModelError(f"{where}: parameter {pid} is {value!r}; ncnn needs an integer >= 1 there")
        if ltype in _WEIGHTED and params.get(_DYNAMIC_WEIGHT) == 1 and nb < 2:
            raise ModelError(f"{where}: takes its weights from an input (19=1) but has {nb} input(s)")
        if ltype in _WEIGHTED and params.get(_DYNAMIC_WEIGHT) != 1:  # dynamic weights come in as a blob, not from .bin
            count_id, out_id, bias_id = _WEIGHTED[ltype]
            count, outputs = params.get(count_id, 0), params.get(out_id, 0)
            if isinstance(count, int) and isinstance(outputs, int) and outputs > 0 and count % outputs:
                raise ModelError(f"{where}: {count} weights are not a multiple of its {outputs} outputs")
            bias = outputs if params.get(bias_id, 0) == 1 and isinstance(outputs, int) else 0
            min_weights += 4 + 2 * max(int(count), 0) + 4 * max(bias, 0)
    if len(produced) != blob_count:
        raise ModelError(
            f"the ncnn target's model.param declares {blob_count} blobs and its layers make {len(produced)}"
        )
    if min_weights > bin_size:
        raise ModelError(
            f"the ncnn target's model.bin has {bin_size} bytes, fewer than the {min_weights} its layers' weights "
            "need; the package is damaged: recompile it"
        )
