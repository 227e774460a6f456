"""Quantisation-aware fine-tuning of a PyTorch module for an engine's int8 policy, handed to luodi's int8 path.

The module (a copy; the caller's is not changed) has its BatchNorms folded into the convolutions before them (the
graph the engines run has them folded), then fake-quant nodes that follow the target backend's ``int8_policy``
(policy.py) exactly as luodi's quantiser (onnxruntime's QDQ quantiser, ptq.py) will write the graph:

- weights of every Conv and Linear: symmetric, per output channel where the policy says so, with the same scale
  (max |w| / qmax) and integer range (7-bit where the policy reduces it) the quantiser computes;
- activations at the tensors the quantiser quantises: the model's inputs and the outputs of Conv/Linear (or of the
  ReLU/ReLU6 fused after them: the quantiser gives the pair one range), pooling; per tensor, uint8 or int8 as the
  policy says, with the quantiser's scale/zero-point formula over an exponential moving average of each tensor's
  min/max (torch.ao's default QAT observer).

Fine-tuning uses straight-through gradients (``torch.fake_quantize_per_*_affine``). The result is a float ONNX
graph whose weights lie on the int8 grid (the quantiser recovers the same integers) and the activation ranges by
ONNX tensor name. The names come from exporting the module once with its activation fake-quants in place: the
exporter writes each as QuantizeLinear/DequantizeLinear, the tensor feeding each QuantizeLinear is the one whose
range it holds, and removing the pairs leaves the float graph with those very names. ``PTQ`` (and so every int8
target of ``luodi.compile``) then takes these ranges instead of calibrating them; tensors QAT did not see (e.g. a
functional residual ``+``) keep a min-max calibration of the fine-tuned model.

torch is imported inside the functions only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CompileError, InputError, NotApplicableError
from .policy import QuantPolicy, TensorPolicy


@dataclass
class QATConfig:
    """What to fine-tune on and how.

    ``data``: the model's inputs ``[N, ...]`` (numpy or torch), or ``(inputs, labels)`` for a classifier trained on
    class indices. Without labels (or with ``loss="distill"``) the loss is the distance of the fake-quantised model's
    outputs to the float model's own (self-distillation), so any representative inputs will do.
    ``target``: the backend whose int8 policy the fake-quant follows (the engines sharing a policy share the result).
    """

    data: Any
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 64
    loss: str = "auto"  # "auto": "labels" when labels are given, else "distill"
    target: str = "onnxruntime"
    ema: float = 0.01  # weight of each batch in the moving average of an activation's min/max
    seed: int = 0
    train_mode: bool = True  # False: dropout (and drop-connect) stay off while fine-tuning


@dataclass
class QATResult:
    """The fine-tuned module (weights on the int8 grid, plain float), its float ONNX graph and the activation ranges
    (ONNX tensor name -> (lowest, highest)) that the int8 quantiser takes instead of calibrating."""

    module: Any
    model: Any
    ranges: dict[str, tuple[float, float]]
    inputs: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def _torch() -> Any:
    from ..frontends.torch import _torch as load

    return load()


def _array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise InputError(f"QATConfig.data: {what} must be a numpy array or a torch tensor, not {type(value).__name__}")
    return value


def _data(config: QATConfig) -> tuple[np.ndarray, np.ndarray | None]:
    data = config.data
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise InputError("QATConfig.data is inputs, or (inputs, labels)")
        x, y = _array(data[0], "the inputs"), _array(data[1], "the labels")
        if len(y) != len(x):
            raise InputError(f"QATConfig.data: {len(x)} inputs but {len(y)} labels")
    else:
        x, y = _array(data, "the inputs"), None
    if len(x) == 0:
        raise InputError("QATConfig.data holds no samples")
    if not config.epochs > 0 or not config.lr > 0 or config.batch_size < 1:
        raise InputError("QATConfig: epochs and lr must be positive and batch_size at least 1")
    if config.loss not in ("auto", "labels", "distill"):
        raise InputError(f"QATConfig.loss '{config.loss}' is not one of auto, labels, distill")
    if config.loss == "labels" and y is None:
        raise InputError("QATConfig.loss 'labels' needs data=(inputs, labels)")
    return x.astype(np.float32, copy=False), y


def _qrange(t: TensorPolicy, reduce: bool = False) -> tuple[int, int]:
    """The integer range onnxruntime's quantiser uses for tensors of policy ``t``."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[t.dtype].tensor_type
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=reduce, symmetric=t.symmetric)
    return int(qmin), int(qmax)


class _ActivationQuant:
    """One activation tensor's fake-quant: an EMA min/max observer and the quantiser's scale/zero point."""

    def __init__(self, act: TensorPolicy, ema: float) -> None:
        self.symmetric = act.symmetric
        self.qmin, self.qmax = _qrange(act)
        # torch's exporter writes QuantizeLinear only for these integer ranges; a symmetric int8 tensor (-127..127
        # in onnxruntime) has zero point 0, so -128 is never reached by a value inside the range
        self.export_range = (0, 255) if self.qmin == 0 else (-128, 127)
        self.ema = ema
        self.lo: float | None = None
        self.hi: float | None = None
        self.observing = True
        self.enabled = False

    def scale_zero_point(self) -> tuple[float, int]:
        from onnxruntime.quantization.quant_utils import compute_scale_zp

        zp, scale = compute_scale_zp(
            np.float32(self.lo), np.float32(self.hi), np.int32(self.qmin), np.int32(self.qmax), self.symmetric
        )
        return float(scale), int(zp)

    def __call__(self, x: Any) -> Any:
        if self.observing:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if self.lo is None or self.hi is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo += self.ema * (lo - self.lo)
                self.hi += self.ema * (hi - self.hi)
        if not self.enabled or self.lo is None:
            return x
        torch = _torch()
        scale, zp = self.scale_zero_point()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, *self.export_range)


def _weight_quant(w: TensorPolicy) -> Any:
    """A parametrisation putting a Conv/Linear weight on the policy's int8 grid (straight-through gradient)."""
    torch = _torch()
    if not w.symmetric:
        raise CompileError("quantisation-aware training supports symmetric int8 weights only (as every policy here)")
    qmin, qmax = _qrange(w, reduce=w.bits == 7)

    class WeightQuant(torch.nn.Module):
        def forward(self, weight: Any) -> Any:
            dims = tuple(range(1, weight.dim()))
            with torch.no_grad():
                absmax = weight.abs().amax(dim=dims) if w.per_channel else weight.abs().max().expand(weight.shape[0])
                scale = (2 * absmax.double() / (qmax - qmin)).float().clamp(min=torch.finfo(torch.float32).tiny)
            zero = torch.zeros(weight.shape[0], dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, qmin, qmax)

    return WeightQuant()


def _calls(module: Any, example: tuple) -> list[tuple[str, Any, int, int]]:
    """Leaf modules in call order on ``example``: (name, module, id of its first input, id of its output)."""
    torch = _torch()
    calls: list[tuple[str, Any, int, int]] = []
    alive: list[Any] = []  # the tensors stay referenced, so no id is reused during the trace
    handles = []
    # leaves, and the layers QAT folds or quantises even where they hold a child (a padding Conv2d subclass)
    layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm)
    for name, sub in module.named_modules():
        if name and (not list(sub.children()) or isinstance(sub, layers)):

            def hook(m: Any, args: tuple, out: Any, name: str = name) -> None:
                first = args[0] if args else None
                alive.extend((first, out))
                calls.append((name, m, id(first), id(out)))

            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _set(module: Any, name: str, value: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, value)


def fold_batchnorms(module: Any, example: tuple) -> int:
    """Fold every BatchNorm fed straight by a convolution into it (eval statistics), in place; how many."""
    torch = _torch()
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    calls = _calls(module, example)
    convs = {out: (name, m) for name, m, _, out in calls if isinstance(m, torch.nn.modules.conv._ConvNd)}
    folded = 0
    for name, m, arg, _ in calls:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and arg in convs:
            conv_name, conv = convs.pop(arg)
            if isinstance(conv, torch.nn.modules.conv._ConvTransposeNd):
                continue
            _set(module, conv_name, fuse_conv_bn_eval(conv, m))
            _set(module, name, torch.nn.Identity())
            folded += 1
    return folded


def _quantised_outputs(module: Any, example: tuple, policy: QuantPolicy) -> list[str]:
    """Names of the leaf modules whose output the quantiser quantises: Conv/Linear (unless a ReLU/ReLU6 fused after
    it takes the range), those activations, average pooling. MaxPool, Flatten, Dropout keep their input's range."""
    nn = _torch().nn
    kinds: list[tuple[type, str]] = [
        (nn.modules.conv._ConvNd, "Conv"),
        (nn.Linear, "Gemm"),
        (nn.ReLU, "Relu"),
        (nn.ReLU6, "Clip"),
        (nn.Hardtanh, "Clip"),
        (nn.modules.pooling._AvgPoolNd, "AveragePool"),
        (nn.modules.pooling._AdaptiveAvgPoolNd, "GlobalAveragePool"),
    ]

    def op(m: Any) -> str | None:
        for kind, name in kinds:
            if isinstance(m, kind) and (name in policy.ops or (name == "Gemm" and "MatMul" in policy.ops)):
                return name
        return None

    calls = _calls(module, example)
    fused = {arg for _, m, arg, _ in calls if op(m) in ("Relu", "Clip")}
    return [name for name, m, _, out in calls if op(m) and not (op(m) in ("Conv", "Gemm") and out in fused)]


def _hooks(names: list[str]) -> dict[str, list[int]]:
    """Module name -> the indices into ``names`` of its calls (a module called twice, e.g. one ReLU6 instance
    after two convs, quantises two tensors: one range each)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(name, []).append(i)
    return out


class _Quantiser:
    """The fake-quant hooks of one module: input, chosen outputs, and the weight parametrisations."""

    def __init__(self, module: Any, example: tuple, policy: QuantPolicy, ema: float) -> None:
        torch = _torch()
        from torch.nn.utils import parametrize

        self.module = module
        self.inputs = [_ActivationQuant(policy.activations, ema) for _ in example]
        names = _quantised_outputs(module, example, policy)
        self.outputs = [_ActivationQuant(policy.activations, ema) for _ in names]
        self.names = names
        self._count: dict[str, int] = {}
        self.weights = []
        for name, sub in module.named_modules():
            if isinstance(sub, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and not isinstance(
                sub, torch.nn.modules.conv._ConvTransposeNd
            ):
                parametrize.register_parametrization(sub, "weight", _weight_quant(policy.weights))
                self.weights.append(name)
        self._handles = [module.register_forward_pre_hook(self._pre)]
        for name, calls in _hooks(names).items():
            self._handles.append(module.get_submodule(name).register_forward_hook(self._post(name, calls)))

    def _post(self, name: str, calls: list[int]) -> Callable[..., Any]:
        def hook(_m: Any, _a: tuple, out: Any) -> Any:
            k = self._count.get(name, 0)
            self._count[name] = k + 1
            return self.outputs[calls[k]](out) if k < len(calls) else out

        return hook

    def _pre(self, _m: Any, args: tuple) -> tuple:
        self._count = {}  # a new forward pass: every module's calls count from the first again
        return tuple(q(a) if i < len(self.inputs) else a for i, (q, a) in enumerate(zip(self.inputs, args)))

    def all(self) -> list[_ActivationQuant]:
        return [*self.inputs, *self.outputs]

    def set(self, observing: bool, enabled: bool) -> None:
        for q in self.all():
            q.observing, q.enabled = observing, enabled

    def bake(self) -> None:
        """Weights stay on the int8 grid as plain parameters (the exported float graph carries them)."""
        from torch.nn.utils import parametrize

        for name in self.weights:
            parametrize.remove_parametrizations(self.module.get_submodule(name), "weight", leave_parametrized=True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def strip_qdq(model: Any, act: TensorPolicy) -> tuple[Any, dict[str, tuple[float, float]]]:
    """``model`` without its activation QuantizeLinear -> DequantizeLinear pairs, and the range each held, by the
    name of the float tensor it quantised (and of the pair's output where that is a graph output, kept by an
    Identity)."""
    import onnx
    from onnx import numpy_helper

    qmin, qmax = _qrange(act)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    keep: list[Any] = []
    ranges: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "DequantizeLinear" or node.input[1] not in consts:
            continue
        scale = float(consts[node.input[1]])
        zp = int(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in consts else 0
        x, y = node.input[0], after[0].output[0]
        ranges[x] = ((qmin - zp) * scale, (qmax - zp) * scale)
        drop.update({id(node), id(after[0])})
        if y in outputs:
            keep.append(onnx.helper.make_node("Identity", [x], [y], name=f"{y}_qat_identity"))
            ranges[y] = ranges[x]
        else:
            rename[y] = x
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if id(node) in drop:
            continue
        copy_ = onnx.NodeProto()
        copy_.CopyFrom(node)
        for i, name in enumerate(copy_.input):
            copy_.input[i] = rename.get(name, name)
        out.graph.node.append(copy_)
    out.graph.node.extend(keep)
    used = {n for node in out.graph.node for n in node.input}
    kept = [t for t in out.graph.node if not (t.op_type == "Constant" and t.output[0] not in used)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    inits = [t for t in out.graph.initializer if t.name in used or t.name in outputs]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out, ranges


def qat(
    module: Any,
    example_inputs: Any,
    config: QATConfig,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    log: Callable[[str], None] | None = None,
) -> QATResult:
    """Fine-tune a copy of ``module`` with fake-quant nodes following ``config.target``'s int8 policy; see the module
    docstring. ``example_inputs`` as for ``luodi.export``."""
    torch = _torch()
    from ..backends import get_backend
    from ..frontends.torch import OPSET, _as_tuple, to_onnx
    from .policy import policy_of

    say = log or (lambda _m: None)
    x, y = _data(config)
    try:
        policy = trained_policy(policy_of(get_backend(config.target)))
    except NotApplicableError as exc:
        raise InputError(f"QATConfig.target: {exc}") from None
    loss_kind = config.loss if config.loss != "auto" else ("labels" if y is not None else "distill")
    example = _as_tuple(example_inputs)
    teacher = module.eval()
    net = copy.deepcopy(module).eval()
    folded = fold_batchnorms(net, example)
    quant = _Quantiser(net, example, policy, config.ema)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    xs = torch.from_numpy(x)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    n, bs = len(xs), min(config.batch_size, len(xs))
    # ranges first seen on up to 8 batches without quantisation (as torch.ao's observers start), then fine-tuning
    quant.set(observing=True, enabled=False)
    with torch.no_grad():
        for i in range(0, min(n, 8 * bs), bs):
            net(xs[i : i + bs])
    quant.set(observing=True, enabled=True)
    steps = max(1, math.ceil(config.epochs * n / bs))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    say(f"quantisation-aware fine-tuning for {policy.backend}'s int8 ({policy.summary()}): {steps} steps, {loss_kind}")
    net.train(config.train_mode)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        out = net(xs[idx])
        out = out[0] if isinstance(out, (tuple, list)) else out
        if loss_kind == "labels":
            loss = torch.nn.functional.cross_entropy(out, ys[idx])
        else:
            with torch.no_grad():
                ref = teacher(xs[idx])
                ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            loss = torch.nn.functional.mse_loss(out, ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            say(f"qat step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    net.eval()
    quant.set(observing=False, enabled=True)
    quant.bake()
    with_qdq = to_onnx(
        net,
        example,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        opset=opset or OPSET,
    )
    float_model, ranges = strip_qdq(with_qdq, policy.activations)
    quant.remove()
    if not ranges:
        raise CompileError("quantisation-aware training found no activation to quantise in the exported graph")
    record = {
        "target": policy.backend,
        "policy": policy.summary(),
        "epochs": config.epochs,
        "steps": steps,
        "samples": n,
        "loss": loss_kind,
        "final_loss": round(float(np.mean(losses[-20:])), 6),
        "batchnorms_folded": folded,
        "weights": len(quant.weights),
        "activation_ranges": len(ranges),
    }
    return QATResult(net, float_model, ranges, x, record)


def trained_policy(policy: QuantPolicy) -> QuantPolicy:
    """``policy`` for a QAT model: no bias correction, nearest weight rounding (the weights are on the grid)."""
    from dataclasses import replace

    return replace(policy, bias_correction=False, weight_rounding="nearest")


def ranges_calibration(calibration: Any, ranges: dict[str, tuple[float, float]]) -> Any:
    """``calibration`` (a Calibration of the fine-tuned float graph, for the tensors QAT did not see) with every
    tensor QAT trained a range for taking that range; method "qat"."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    from .calibrate import Calibration

    data = dict(calibration.ranges.items())
    trained = 0
    for name in data:
        if name in ranges:
            lo, hi = ranges[name]
            data[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            trained += 1
    return Calibration(
        "qat", TensorsData(calibration.ranges.calibration_method, data), calibration.samples, trained=trained
    )


__all__ = ["QATConfig", "QATResult", "fold_batchnorms", "qat", "ranges_calibration", "strip_qdq", "trained_policy"]
