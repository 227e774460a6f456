"""BatchNorm folding: an inference BatchNormalization after a Conv or Gemm becomes that layer's weights.

Only folds when the weights, bias and BN statistics are constants and the layer's output feeds
nothing but the BN; shared weights are copied, never changed for another reader.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Pass, PassContext
from .graph import attribute, consumers, fresh_name, initializer_arrays, producers, replace_initializer, set_attribute


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into the Conv or Gemm before it (scale the weights, shift the bias)"

    def run(self, model: Any, ctx: PassContext) -> Any:
        graph = model.graph
        consts = initializer_arrays(graph)
        uses, made_by = consumers(graph), producers(graph)
        graph_outputs = {o.name for o in graph.output}
        folded = []
        for bn in list(graph.node):
            if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
                continue
            if attribute(bn, "training_mode", 0):
                continue
            layer = made_by.get(bn.input[0])
            if layer is None or layer.op_type not in ("Conv", "Gemm") or layer.output[0] in graph_outputs:
                continue
            if len(uses.get(layer.output[0], [])) != 1 or any(n not in consts for n in bn.input[1:5]):
                continue
            if layer.input[1] not in consts or (
                len(layer.input) > 2 and layer.input[2] and layer.input[2] not in consts
            ):
                continue
            gamma, beta, mean, var = (consts[n].astype(np.float64) for n in bn.input[1:5])
            scale = gamma / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
            shift = beta - mean * scale
            ok = (
                self._fold_conv(graph, layer, consts, scale, shift)
                if layer.op_type == "Conv"
                else (self._fold_gemm(graph, layer, consts, scale, shift))
            )
            if not ok:
                continue
            layer.output[0] = bn.output[0]  # the layer now writes what the BN wrote
            graph.node.remove(bn)
            folded.append(f"{bn.name or bn.output[0]} -> {layer.name or layer.op_type}")
        ctx.notes.append(f"{len(folded)} BatchNormalization node(s) folded")
        return model

    @staticmethod
    def _bias(layer: Any, consts: dict[str, np.ndarray], n: int) -> np.ndarray:
        if len(layer.input) > 2 and layer.input[2]:
            return np.broadcast_to(consts[layer.input[2]].astype(np.float64), (n,))
        return np.zeros(n)

    def _fold_conv(self, graph: Any, conv: Any, consts: dict, scale: np.ndarray, shift: np.ndarray) -> bool:
        w = consts[conv.input[1]]
        if w.shape[0] != scale.shape[0]:
            return False
        new_w = (w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
        new_b = (self._bias(conv, consts, w.shape[0]) * scale + shift).astype(w.dtype)
        self._store(graph, conv, new_w, new_b)
        return True

    def _fold_gemm(self, graph: Any, gemm: Any, consts: dict, scale: np.ndarray, shift: np.ndarray) -> bool:
        w = consts[gemm.input[1]]
        trans_b = attribute(gemm, "transB", 0)
        out_axis = 0 if trans_b else 1
        if w.ndim != 2 or w.shape[out_axis] != scale.shape[0]:
            return False
        beta = float(attribute(gemm, "beta", 1.0))
        col = scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1)
        new_w = (w.astype(np.float64) * col).astype(w.dtype)
        if len(gemm.input) > 2 and gemm.input[2]:
            c = consts[gemm.input[2]].astype(np.float64)
            if c.size not in (1, scale.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                return False  # a per-row bias cannot become a per-feature one
            bias = beta * np.broadcast_to(c.reshape(-1), scale.shape)
        else:
            bias = np.zeros_like(scale)
        new_b = (bias * scale + shift).astype(w.dtype)
        # alpha*A*(B*s) + (beta*C*s + shift): alpha stays, beta is now inside the new bias
        set_attribute(gemm, "beta", 1.0)
        self._store(graph, gemm, new_w, new_b)
        return True

    @staticmethod
    def _store(graph: Any, layer: Any, w: np.ndarray, b: np.ndarray) -> None:
        w_name = fresh_name(graph, f"{layer.input[1]}_bnfolded")
        b_name = fresh_name(graph, f"{layer.name or layer.output[0]}_bias_bnfolded")
        replace_initializer(graph, w_name, w)
        replace_initializer(graph, b_name, b)
        layer.input[1] = w_name
        if len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
