"""Mixed precision below fp32 (issue 18 item 2): the int8 fallback keeps layers in bf16 on openvino where the CPU
runs bf16 (AVX512_BF16 or AMX), chooses by measured latency as well as agreement, and records the Pareto front; a
package whose int8 target has bf16 float layers loads in bf16 or is refused. Per capability, read from the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("openvino", reason="openvino is not installed: pip install 'luodi[openvino]'")

import luodi  # noqa: E402
from luodi.backends import LoadOptions, get_backend  # noqa: E402
from luodi.quant import calibrate, fallback, float_precisions, measure_on, policy_of  # noqa: E402
from luodi.quant.ptq import named  # noqa: E402


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(ln.split(":", 1)[1].split()) for ln in fh if ln.startswith("flags")), set())
    except OSError:
        return set()


# OpenVINO's CPU plugin runs bf16 with AVX512_BF16 or AMX-BF16; read from the CPU, not from the engine under test
CPU_BF16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


# five classes, each a colour (per-channel mean) far from the others: a picture is its class's colour plus noise
COLOURS = np.array([[0.5, 0.5, 2.0], [0.5, 2.0, 0.5], [2.0, 0.5, 0.5], [1.5, 1.5, 0.5], [0.5, 1.5, 1.5]], np.float32)


def outlier_cnn() -> onnx.ModelProto:
    """A nearest-colour classifier whose first activation int8 cannot hold: Conv 1x1 (3->4: channel 0 is 1000x the
    sum of the colours, 1-3 copy them) -> Relu -> Conv 1x1 that drops channel 0 -> Relu -> GlobalAveragePool ->
    Gemm (each class's score: its colour . features - |colour|^2 / 2). One per-tensor uint8 scale for the first
    activation rounds the colours to nothing, so plain int8 gives one class; keeping the first layers in float,
    fp32 or bf16 (a scale per element), restores every prediction."""
    w1 = np.zeros((4, 3, 1, 1), np.float32)
    w1[0, :, 0, 0] = 1000
    w1[1:, :, 0, 0] = np.eye(3)
    w2 = np.zeros((3, 4, 1, 1), np.float32)
    w2[:, 1:, 0, 0] = np.eye(3)
    fb = -0.5 * (COLOURS**2).sum(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (COLOURS, "fw"), (fb, "fb"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _images(n: int, seed: int) -> np.ndarray:
    """``n`` pictures, the classes in turn: each its class's colour plus a little noise."""
    rng = np.random.default_rng(seed)
    colours = COLOURS[np.arange(n) % len(COLOURS), :, None, None]
    return (colours + 0.1 * rng.standard_normal((n, 3, 8, 8))).astype(np.float32)


def test_the_fallback_times_each_precision_and_keeps_the_fastest_that_meets_the_budget():
    """luodi.quant.fallback over bf16 (where the CPU runs it) and fp32 on openvino, each attempt run and timed on the
    engine: the choice is the fastest attempt within the budget, and the front is every attempt no other beats."""
    backend = get_backend("openvino")
    assert ("bf16" in backend.int8_float_precisions()) == CPU_BF16
    assert float_precisions(backend, "auto") == (*backend.int8_float_precisions(), "fp32")
    assert "fp16" not in backend.int8_float_precisions()  # an int8 graph at the fp16 hint gave wrong outputs here
    model, policy = named(outlier_cnn()), policy_of(backend)
    feeds = [{"x": x[None]} for x in _images(20, 2)]
    calibration = calibrate(model, [{"x": x[None]} for x in _images(10, 1)], "minmax", policy)
    wanted = ("bf16", "fp32") if CPU_BF16 else ("fp32",)

    def run(q, precision):
        return measure_on(backend, q, feeds, float_precision=precision, timed_runs=10)

    _, decision = fallback(model, calibration, policy, feeds, 0.0, run, float_precisions=wanted)
    steps = decision.steps
    assert steps[0]["float_layers"] == 0 and steps[0]["agreement"] < 1, "plain int8 agrees: nothing to fall back"
    assert {s["float_precision"] for s in steps if s["float_layers"]} == set(wanted), steps
    assert decision.met and decision.float_nodes, steps
    met = [s for s in steps if s["agreement"] == 1.0]
    fastest = min(met, key=lambda s: s["latency_ms"])
    assert (decision.latency_ms, decision.float_precision) == (fastest["latency_ms"], fastest["float_precision"])
    assert decision.record()["float_precision"] == decision.float_precision
    # the front: fastest first, each point more accurate than every faster one, and no attempt beats a point on both
    front = decision.pareto
    assert front and [p["latency_ms"] for p in front] == sorted(p["latency_ms"] for p in front)
    assert all(a["agreement"] < b["agreement"] for a, b in zip(front, front[1:]))
    for p in front:
        assert not any(s["latency_ms"] < p["latency_ms"] and s["agreement"] >= p["agreement"] for s in steps), p
    assert decision.pareto[-1]["agreement"] == 1.0 and any(p == fastest for p in front)


def test_bf16_float_layers_in_the_package_load_as_bf16_around_int8_layers(tmp_path):
    """Compiled with ``float_precision=bf16``: the record and the target's options say bf16, the engine runs the
    float layers in bf16 kernels and the rest in int8 ones; on a CPU without bf16 the target fails, saying why."""
    out = tmp_path / "mixed.luodi"
    pkg = luodi.compile(
        outlier_cnn(),
        out,
        targets=["openvino:int8"],
        calibration=_images(10, 1),
        validation=_images(20, 2),
        accuracy_budget="0%",
        target_options={"openvino": {"float_precision": "bf16"}},
    )
    entry = pkg.find_target("openvino", "int8")
    if not CPU_BF16:
        assert entry["status"] == "failed" and "without BF16" in entry["reason"], entry
        return
    q = entry["quantization"]
    assert q["float_layers"] and q["float_precision"] == "bf16" and q["fallback"]["float_precision"] == "bf16", q
    assert entry["options"]["float_precision"] == "bf16" and entry["options"]["inference_precision_hint"] == "bf16"
    engine = get_backend("openvino").load(pkg.artifact(entry), LoadOptions(extra={"profiling": True}))
    with engine:
        assert engine.inference_precision == "bf16"
        engine.run({"x": _images(2, 3)})
        kernels = {p["node"]: (p["op"], p["kernel"]) for p in engine.profile()}
    compute = {n: k for n, (op, k) in kernels.items() if op.startswith(("Convolution", "FullyConnected"))}
    floats = [n for n in q["float_layers"] if n in compute]
    assert floats and all(compute[n].endswith("_bf16") for n in floats), kernels  # the float layers run in bf16
    assert any(k.endswith("_I8") for n, k in compute.items() if n not in floats), kernels  # the int8 ones stay int8
    with luodi.Session(out, backend="openvino", precision="int8") as s:
        assert s.run({"x": _images(4, 4)})["y"].shape == (4, 5)
