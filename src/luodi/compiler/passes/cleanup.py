"""Clean-up passes: drop Identity and inference-time Dropout nodes, and nodes nothing reads.

They only remove work; the values reaching the graph outputs are unchanged bit for bit.
"""

from __future__ import annotations

from typing import Any

from .base import Pass, PassContext
from .graph import _subgraph_reads, consumers, rename_tensor


class EliminateIdentity(Pass):
    name = "eliminate-identity"
    summary = "remove Identity nodes and Dropout (a no-op at inference) by wiring their input through"

    def run(self, model: Any, ctx: PassContext) -> Any:
        graph = model.graph
        graph_inputs = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        graph_outputs = {o.name for o in graph.output}
        uses = consumers(graph)
        removed = []
        for node in list(graph.node):
            if node.op_type not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx"):
                continue
            # Dropout with training_mode (input 2) or a used mask (output 1) is more than a copy
            if node.op_type == "Dropout" and (
                (len(node.input) > 2 and node.input[2]) or (len(node.output) > 1 and uses.get(node.output[1]))
            ):
                continue
            src, dst = node.input[0], node.output[0]
            if dst in graph_outputs:
                if src in graph_inputs or src in graph_outputs:
                    continue  # a graph output that is an input's copy must stay a copy
                rename_tensor(graph, src, dst, producers=True)  # the graph output keeps its name
            else:
                rename_tensor(graph, dst, src)
            graph.node.remove(node)
            removed.append(node.op_type)
        ctx.notes.append(f"{removed.count('Identity')} Identity and {removed.count('Dropout')} Dropout node(s) removed")
        return model


class EliminateDeadNodes(Pass):
    name = "eliminate-dead-nodes"
    summary = "remove nodes and initializers that no graph output depends on"

    def run(self, model: Any, ctx: PassContext) -> Any:
        graph = model.graph
        needed = {o.name for o in graph.output}
        live = []
        for node in reversed(graph.node):
            if any(o in needed for o in node.output if o):
                live.append(node)
                needed.update(n for n in node.input if n)
                needed.update(_subgraph_reads(node))
        dead_nodes = len(graph.node) - len(live)
        del graph.node[:]
        graph.node.extend(reversed(live))
        used = set(consumers(graph)) | {o.name for o in graph.output}
        # Deleted in place: re-adding the kept ones would copy every weight (and protobuf cannot copy a tensor
        # over 2 GB at all).
        dead = [i for i, t in enumerate(graph.initializer) if t.name not in used]
        dead_names = {graph.initializer[i].name for i in dead}
        for i in reversed(dead):
            del graph.initializer[i]
        dead_inits = len(dead)
        # Before IR 4 every initializer was also a graph input (an input with a default). Its input entry goes with
        # it, or the model would gain a required input that nothing reads (centerface gained 60).
        for i in reversed([i for i, v in enumerate(graph.input) if v.name in dead_names]):
            del graph.input[i]
        alive = used | {o for n in graph.node for o in n.output}
        stale = [v for v in graph.value_info if v.name not in alive]
        for v in stale:
            graph.value_info.remove(v)
        ctx.notes.append(f"{dead_nodes} dead node(s) and {dead_inits} unused initializer(s) removed")
        return model
