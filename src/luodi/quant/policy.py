"""A backend's int8 quantisation policy as plain data (PPQ-style), and its reading into quantiser settings.

Each backend declares one table (``Backend.int8_policy``); nothing here knows about a particular engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CompileError, NotApplicableError

# Operators whose inputs/outputs get QuantizeLinear/DequantizeLinear when a policy does not say otherwise:
# the ones every int8 CPU engine here has kernels for (convolutions, matrix products, pooling, residual adds).
DEFAULT_OPS = ("Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat")


@dataclass(frozen=True)
class TensorPolicy:
    """How one kind of tensor (activations or weights) is quantised."""

    dtype: str  # "int8" | "uint8"
    symmetric: bool
    per_channel: bool = False
    bits: int = 8  # 7 = "reduce range": the top bit unused, for int8 kernels that would saturate otherwise


@dataclass(frozen=True)
class QuantPolicy:
    """One engine's int8 rules: what the quantiser must write so that the QDQ graph simulates that engine."""

    backend: str
    activations: TensorPolicy
    weights: TensorPolicy
    rounding: str = "half_to_even"  # ONNX QuantizeLinear's rounding; engines that round otherwise say so
    ops: tuple[str, ...] = DEFAULT_OPS
    format: str = "qdq"
    notes: str = ""
    # shift each int8 Conv/Gemm bias by the mean error of its rounded weights (bias.py); the engine runs the
    # corrected bias like any other, so this changes what is quantised, not how the engine computes
    bias_correction: bool = True
    # "gptq": choose each int8 weight's integer to minimise the layer's output error on the calibration inputs
    # (rounding.py); "nearest": round each weight on its own. Scales and graph are the same either way.
    weight_rounding: str = "gptq"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(cls, backend: str, table: dict[str, Any]) -> QuantPolicy:
        try:
            return cls(
                backend=backend,
                activations=TensorPolicy(**table["activations"]),
                weights=TensorPolicy(**table["weights"]),
                rounding=table.get("rounding", "half_to_even"),
                ops=tuple(table.get("ops", DEFAULT_OPS)),
                format=table.get("format", "qdq"),
                notes=table.get("notes", ""),
                bias_correction=bool(table.get("bias_correction", True)),
                weight_rounding=str(table.get("weight_rounding", "gptq")),
                extra=dict(table.get("extra", {})),
            )
        except (KeyError, TypeError) as exc:
            raise CompileError(f"backend '{backend}' has a malformed int8 policy table: {exc}") from exc

    def summary(self) -> str:
        a, w = self.activations, self.weights
        return (
            f"act {a.dtype} {'sym' if a.symmetric else 'asym'} per-tensor, "
            f"w {w.dtype}{'' if w.bits == 8 else f'({w.bits}-bit)'} {'sym' if w.symmetric else 'asym'} "
            f"{'per-channel' if w.per_channel else 'per-tensor'}, {self.rounding}"
            + (", bias-corrected" if self.bias_correction else "")
            + (", GPTQ-rounded weights" if self.weight_rounding == "gptq" else "")
        )

    def ort_arguments(self) -> dict[str, Any]:
        """The onnxruntime.quantization.quantize_static arguments that write this policy's QDQ graph."""
        from onnxruntime.quantization import QuantFormat, QuantType

        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        if self.format != "qdq":
            raise CompileError(f"{self.backend}'s int8 policy asks for format '{self.format}'; luodi writes QDQ only")
        if self.rounding != "half_to_even":
            # QuantizeLinear rounds half to even; a graph for an engine rounding otherwise would not simulate it.
            raise CompileError(
                f"{self.backend} rounds '{self.rounding}', which an ONNX QDQ graph cannot simulate; "
                "its int8 target needs the engine's own quantiser"
            )
        if self.weight_rounding not in ("gptq", "nearest"):
            raise CompileError(f"{self.backend}: unknown weight_rounding '{self.weight_rounding}' (gptq, nearest)")
        if self.activations.per_channel:
            raise CompileError(f"{self.backend}: per-channel activations are not supported by the QDQ quantiser")
        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": qtype[self.activations.dtype],
            "weight_type": qtype[self.weights.dtype],
            "per_channel": self.weights.per_channel,
            "reduce_range": self.weights.bits == 7,
            "op_types_to_quantize": list(self.ops),
            "extra_options": {
                "ActivationSymmetric": self.activations.symmetric,
                "WeightSymmetric": self.weights.symmetric,
            },
        }


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX); non-x86 hosts
    are taken to have one (ARM's sdot does not saturate)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def policy_of(backend: Any) -> QuantPolicy:
    """The int8 policy ``backend`` declares for this host, or NotApplicableError saying why it has none.

    A table may say ``"weight_bits_without_vnni": 7``: on x86 without VNNI the u8 x s8 kernels (VPMADDUBSW) add
    pairs of products in int16 and saturate with full 8-bit weights, so the engine would not compute what the
    QDQ graph says (measured on EfficientNet-Lite0 with bias correction, onnxruntime: 66% top-1 agreement and
    8.5 dB logits SNR deployed vs 91% and 22.3 dB simulated; 7-bit weights: 88%, deployed and simulated agree).
    uint8 asymmetric weights (u8 x u8 kernels) avoid the saturation with all 8 bits (90.5% on onnxruntime, 91.7%
    on openvino) but ran 5x (onnxruntime) and 2x (openvino) slower than the 7-bit int8 weights here, slower than
    fp32, so they are not the policy."""
    table = getattr(backend, "int8_policy", None)
    if table is None:
        why = getattr(backend, "int8_unsupported", "") or "it declares no int8 policy"
        raise NotApplicableError(f"backend '{backend.name}' has no int8 target: {why}")
    policy = QuantPolicy.from_table(backend.name, table)
    bits = table.get("weight_bits_without_vnni")
    if bits and not cpu_has_vnni():
        from dataclasses import replace

        policy = replace(policy, weights=replace(policy.weights, bits=int(bits)))
    return policy
