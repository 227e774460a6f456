"""ONNX operator conformance: run the ONNX backend node test cases through a luodi backend.

Each case goes through the backend's own compile() and load() and the Engine's run(), exactly as a
package would, and is compared with the case's expected outputs at the case's rtol/atol. It reports;
it never changes a backend.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..backends import CompileOptions, LoadOptions, get_backend
from ..errors import LuodiError, NotApplicableError, UnsupportedOpError

# Statuses, best first.
PASS, MISMATCH, UNSUPPORTED, COMPILE_ERROR, RUN_ERROR, NOT_APPLICABLE = (
    "pass",
    "mismatch",
    "unsupported",
    "compile-error",
    "run-error",
    "not-applicable",
)

# A fixed, representative subset that every backend must pass (the unit tests run these).
SUBSET = [
    "test_basic_conv_with_padding",
    "test_conv_with_strides_padding",
    "test_gemm_default_vector_bias",
    "test_gemm_transposeB",
    "test_maxpool_2d_default",
    "test_averagepool_2d_default",
    "test_globalaveragepool",
    "test_relu",
    "test_sigmoid",
    "test_tanh",
    "test_leakyrelu",
    "test_softmax_axis_1",
    "test_reshape_reordered_all_dims",
    "test_transpose_all_permutations_1",
    "test_concat_2d_axis_1",
    "test_slice",
    "test_flatten_axis1",
    "test_resize_upsample_scales_nearest",
]


@dataclass
class CaseResult:
    case: str
    backend: str
    status: str
    ops: list[str]
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def node_cases(names: list[str] | None = None) -> list[Any]:
    """The ONNX node test cases (built in memory by onnx), optionally only those named."""
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    if names is None:
        return cases
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise LuodiError(f"no ONNX node test case named {missing}")
    return [by_name[n] for n in names]


def freeze_integer_inputs(model: Any, feeds: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """Turn parameter inputs (shapes, axes, starts/ends, Resize scales) into initializers, as deployed.

    Deployment engines (ncnn, MNN, OpenVINO's static path) expect such parameters to be constants;
    the ONNX node tests pass them as inputs only because the tests are generic.
    """
    import onnx
    from onnx import numpy_helper

    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    graph = frozen.graph
    params = _parameter_inputs(graph)
    keep = []
    for vi in graph.input:
        value = feeds.get(vi.name)
        if value is not None and (vi.name in params or _is_small_int(value)):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
        else:
            keep.append(vi)
    del graph.input[:]
    graph.input.extend(keep)
    return frozen, {vi.name: feeds[vi.name] for vi in keep}


def run_case(backend_name: str, case: Any) -> CaseResult:
    """Run one node test case as given; if that fails and it has integer inputs, again with them frozen.

    Engines differ: some need shape parameters as constants (ncnn, MNN), some handle constants less
    well than inputs. A case counts as passed if either form passes, as a deployment would choose.
    """
    first = _run_case(backend_name, case, freeze_integers=False)
    if first.status in (PASS, NOT_APPLICABLE):
        return first
    inputs = case.data_sets[0][0]
    if not (any(_is_small_int(v) for v in inputs) or _parameter_inputs(case.model.graph)):
        return first
    second = _run_case(backend_name, case, freeze_integers=True)
    if second.status == PASS:
        second.detail = "passes with its integer inputs frozen into constants"
        return second
    return first


def _run_case(backend_name: str, case: Any, freeze_integers: bool) -> CaseResult:
    model = case.model
    ops = sorted({n.op_type for n in model.graph.node})
    result = CaseResult(case.name, backend_name, PASS, ops)
    if not _tensor_only(model):
        result.status, result.detail = NOT_APPLICABLE, "string/sequence/optional values: luodi passes numeric tensors"
        return result
    inputs, expected = case.data_sets[0]
    names = [vi.name for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    feeds = {n: np.asarray(v) for n, v in zip(names, inputs)}
    if freeze_integers:
        model, feeds = freeze_integer_inputs(model, feeds)
    backend = get_backend(backend_name)
    try:
        artifact = backend.compile(model, CompileOptions())
        engine = backend.load(artifact, LoadOptions())
    except UnsupportedOpError as exc:
        result.status, result.detail = UNSUPPORTED, str(exc)
        return result
    except NotApplicableError as exc:
        result.status, result.detail = NOT_APPLICABLE, str(exc)
        return result
    except Exception as exc:  # engines raise their own types; a conformance run records them all
        result.status, result.detail = COMPILE_ERROR, f"{type(exc).__name__}: {exc}"[:300]
        return result
    try:
        got = engine.run(feeds)
    except Exception as exc:
        result.status, result.detail = RUN_ERROR, f"{type(exc).__name__}: {exc}"[:300]
        return result
    finally:
        engine.close()
    out_names = [o.name for o in model.graph.output]
    for name, want in zip(out_names, expected):
        have = got.get(name)
        want = np.asarray(want)
        if have is None or np.asarray(have).shape != want.shape:
            shape = None if have is None else list(np.asarray(have).shape)
            result.status, result.detail = MISMATCH, f"output '{name}': shape {shape}, expected {list(want.shape)}"
            return result
        have = np.asarray(have)
        if want.dtype.kind in "fc":
            ok = np.allclose(
                have.astype(np.float64), want.astype(np.float64), rtol=case.rtol, atol=case.atol, equal_nan=True
            )
        else:
            ok = np.array_equal(have.astype(want.dtype), want)
        if not ok:
            diff = np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))) if have.size else 0.0
            result.status, result.detail = MISMATCH, f"output '{name}': max abs diff {diff:.3g}"
            return result
    return result


# Inputs that are parameters, not data, whatever their dtype: Resize's roi/scales/sizes.
_PARAMETER_SLOTS = {"Resize": (1, 2, 3), "Upsample": (1,)}


def _parameter_inputs(graph: Any) -> set[str]:
    names = {vi.name for vi in graph.input}
    return {
        n.input[i]
        for n in graph.node
        for i in _PARAMETER_SLOTS.get(n.op_type, ())
        if i < len(n.input) and n.input[i] in names
    }


def _is_small_int(value: Any) -> bool:
    arr = np.asarray(value)
    return arr.dtype.kind in "iu" and arr.ndim <= 1


def _tensor_only(model: Any) -> bool:
    from ..tensor import _ONNX_TO_NUMPY

    return all(
        vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _ONNX_TO_NUMPY
        for vi in list(model.graph.input) + list(model.graph.output)
    )
