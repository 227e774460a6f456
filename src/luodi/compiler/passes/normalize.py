"""Fold the pipeline's input normalisation ((pixel - mean) / std per channel) into the first convolution.

Pre-processing then hands the model plain pixel values and does one step less per image. Folds only
when it is exact: the input feeds one Conv (group 1, maybe through a constant Pad), and padding can be
kept exact (the border is padded with the mean, which normalises to the zero the model was trained with).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...package.schema import FOLDED_NORMALIZATION
from .base import Pass, PassContext
from .graph import attribute, consumers, fresh_name, initializer_arrays, replace_initializer, set_attribute

#: Pipeline ops that may sit between ``normalize`` and the model without changing pixel values.
_LAYOUT_ONLY = {"to_tensor"}
#: Where a folded normalisation is recorded in the pipeline spec (the compiler hands it to every backend).
FOLDED_KEY = FOLDED_NORMALIZATION


class FoldInputNormalization(Pass):
    name = "fold-input-normalization"
    summary = "fold the pipeline's normalize (mean/std) step into the first Conv's weights and bias"

    def run(self, model: Any, ctx: PassContext) -> Any:
        found = self._normalize_step(ctx.pipeline)
        if found is None:
            ctx.notes.append("nothing to fold: the pipeline has no normalize step feeding the model directly")
            return model
        index, step = found
        graph = model.graph
        input_name = ctx.pipeline.get("input") or graph.input[0].name
        reason = self._fold(graph, input_name, step)
        if reason:
            ctx.notes.append(f"not folded: {reason}")
            return model
        pipeline = dict(ctx.pipeline)
        pipeline["pre"] = [s for i, s in enumerate(pipeline["pre"]) if i != index]
        pipeline[FOLDED_KEY] = {"input": input_name, "mean": list(step["mean"]), "std": list(step["std"])}
        ctx.pipeline = pipeline
        ctx.notes.append(
            f"normalize(mean={step['mean']}, std={step['std']}) folded into the first Conv; "
            f"input '{input_name}' now takes pixel values"
        )
        return model

    @staticmethod
    def _normalize_step(pipeline: dict[str, Any] | None) -> tuple[int, dict[str, Any]] | None:
        pre = (pipeline or {}).get("pre") or []
        for i, step in enumerate(pre):
            if isinstance(step, dict) and step.get("op") == "normalize":
                later = [s.get("op") for s in pre[i + 1 :] if isinstance(s, dict)]
                if all(op in _LAYOUT_ONLY for op in later) and any(
                    s.get("op") == "to_tensor" and s.get("layout", "CHW") == "CHW" for s in pre[i + 1 :]
                ):
                    return i, step
                return None
        return None

    def _fold(self, graph: Any, input_name: str, step: dict[str, Any]) -> str:
        """Fold in place and return "", or return why it cannot be folded exactly (graph untouched)."""
        consts = initializer_arrays(graph)
        uses = consumers(graph)
        # Shape/Size read only the input's shape (e.g. the batch size), never its values
        readers = [n for n in uses.get(input_name, []) if n.op_type not in ("Shape", "Size")]
        if len(readers) != 1:
            return f"input '{input_name}' feeds {len(readers)} nodes, not one Conv"
        node = readers[0]
        pad = None
        if node.op_type == "Pad":
            pad = node
            if attribute(pad, "mode", b"constant") not in (b"constant", "constant"):
                return "the first Pad is not a constant pad"
            if len(pad.input) > 2 and pad.input[2] and float(np.asarray(consts.get(pad.input[2], 1)).ravel()[0]) != 0:
                return "the first Pad pads with a non-zero value"
            if len(pad.input) > 3 and pad.input[3]:
                return "the first Pad names axes"
            after = uses.get(pad.output[0], [])
            if len(after) != 1:
                return "the first Pad feeds more than one node"
            node = after[0]
        conv = node
        if conv.op_type != "Conv" or conv.input[0] != (pad.output[0] if pad else input_name):
            return f"the input's first consumer is {conv.op_type}, not Conv"
        if attribute(conv, "group", 1) != 1:
            return "the first Conv is grouped"
        if conv.input[1] not in consts or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in consts):
            return "the first Conv's weights are not constants"
        w = consts[conv.input[1]]
        channels = w.shape[1]
        mean = np.broadcast_to(np.asarray(step["mean"], np.float64), (channels,))
        std = np.broadcast_to(np.asarray(step["std"], np.float64), (channels,))
        if np.any(std == 0):
            return "a std of 0"
        auto_pad = attribute(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        conv_pads = list(attribute(conv, "pads", []) or [])
        padded = pad is not None or any(conv_pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
        if padded and not np.all(mean == mean[0]):
            return "the first Conv pads its border and the channel means differ (a Pad has one value)"
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return "the first Conv uses auto_pad SAME_*"

        # (x - m) / s convolved with W  ==  x convolved with W / s, plus a bias shift of -sum(W * m / s)
        w64 = w.astype(np.float64)
        new_w = w64 / std.reshape(1, -1, *[1] * (w.ndim - 2))
        shift = (w64 * (mean / std).reshape(1, -1, *[1] * (w.ndim - 2))).sum(axis=tuple(range(1, w.ndim)))
        bias = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        w_name = fresh_name(graph, f"{conv.input[1]}_normfolded")
        b_name = fresh_name(graph, f"{conv.name or 'conv'}_bias_normfolded")
        replace_initializer(graph, w_name, new_w.astype(w.dtype))
        replace_initializer(graph, b_name, (bias - shift).astype(w.dtype))
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        if padded:
            self._pad_with_mean(graph, pad, conv, conv_pads, float(mean[0]), w.dtype)
        return ""

    @staticmethod
    def _pad_with_mean(graph: Any, pad: Any, conv: Any, conv_pads: list[int], value: float, dtype: Any) -> None:
        """Pixels outside the image must normalise to 0 as before: pad with the mean instead of 0."""
        from onnx import helper

        value_name = fresh_name(graph, "normfolded_pad_value")
        replace_initializer(graph, value_name, np.asarray(value, dtype=dtype))
        if pad is not None:
            while len(pad.input) < 3:
                pad.input.append("")
            pad.input[2] = value_name
        if any(conv_pads):
            # Conv can only pad with zeros: move its padding into an explicit Pad (NCHW: no pad on N, C)
            k = len(conv_pads) // 2
            pads = [0, 0, *conv_pads[:k], 0, 0, *conv_pads[k:]]
            pads_name = fresh_name(graph, "normfolded_pads")
            replace_initializer(graph, pads_name, np.asarray(pads, dtype=np.int64))
            padded = fresh_name(graph, f"{conv.input[0]}_padded")
            # mode written out: pnnx (ncnn) leaves a Pad without an explicit mode unconverted
            node = helper.make_node(
                "Pad",
                [conv.input[0], pads_name, value_name],
                [padded],
                name=fresh_name(graph, "normfolded_pad"),
                mode="constant",
            )
            index = list(graph.node).index(conv)
            graph.node.insert(index, node)
            conv.input[0] = padded
            set_attribute(conv, "pads", [0] * len(conv_pads))
