"""int8 policies as data, one table per way of running int8, shared by the backends that run it that way.

luodi.quant reads a backend's table (``Backend.int8_policy``, see luodi/quant/policy.py); nothing here runs code.
"""

from __future__ import annotations

from typing import Any

QDQ_U8S8: dict[str, Any] = {
    "activations": {"dtype": "uint8", "symmetric": False},
    "weights": {"dtype": "int8", "symmetric": True, "per_channel": True, "bits": 8},
    "weight_bits_without_vnni": 7,  # see luodi.quant.policy.policy_of (u8 x u8 was 2-5x slower here)
    "bias_correction": True,
    "rounding": "half_to_even",
    "ops": ["Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "AveragePool", "GlobalAveragePool", "MaxPool"],
    "format": "qdq",
}
"""An ONNX QDQ graph run by an x86 CPU engine as u8 activations x s8 weights: onnxruntime (which fuses each QDQ
node unit into an int8 kernel: QLinearConv, MatMulInteger...) and OpenVINO (which reads QDQ into FakeQuantize and
runs it with oneDNN). uint8 activations, asymmetric: the x86 kernels are u8 x s8 (an s8 x s8 graph is shifted to
u8 or runs ~8x slower as QOperator); symmetric per-channel int8 weights; QuantizeLinear rounds half to even.
Without VNNI, VPMADDUBSW saturates on 8-bit weights, hence 7-bit weights there."""

VENDOR_W8A8: dict[str, Any] = {
    "activations": {"dtype": "int8", "symmetric": False},
    "weights": {"dtype": "int8", "symmetric": True, "per_channel": True, "bits": 8},
    "bias_correction": False,
    "weight_rounding": "nearest",
    "ops": ["Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "AveragePool", "GlobalAveragePool", "MaxPool"],
    "format": "qdq",
}
"""A vendor toolkit's own w8a8 (TFLite's int8 scheme, which rknn-toolkit2 follows too): asymmetric per-tensor int8
activations, symmetric per-channel int8 weights, no bias correction. The toolkit quantises the model itself; a
backend adds its rounding and notes, and the table only lets luodi's sensitivity ranking simulate it."""
