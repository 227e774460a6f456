"""Graph pipelines: a small DAG of op steps and model calls over named values, checked when it is built.

It wires steps and times them; it does no pre/post work itself (ops do) and never touches an engine (Session does).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..tensor import TensorSpec
from .registry import build_op

#: The value a graph starts from: what the user gave to ``Session.predict``.
RAW = "input"
#: How a graph names the package's primary model; further models are called by their own names.
MAIN = "main"

ModelSpecs = Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]]


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise PipelineError(f"{where} must be a value name or a list of value names, got {value!r}")


class OpStep:
    """``{"op": name, "in": ..., "out": ..., **params}``: one op on named values."""

    def __init__(self, index: int, step: dict[str, Any]) -> None:
        where = f"graph step {index} ({step.get('op')})"
        self.ins = _names(step.get("in", RAW), f"{where}: 'in'")
        self.outs = _names(step.get("out"), f"{where}: 'out'") if "out" in step else []
        if not self.outs:
            raise PipelineError(f"{where} needs 'out': the name(s) of the value(s) it makes")
        self.op = build_op({k: v for k, v in step.items() if k not in ("in", "out")})
        self.stage = getattr(self.op, "stage", "pre")
        self.label = step["op"]

    def run(self, values: dict[str, Any], session: Any, options: dict[str, Any]) -> None:
        wanted = {k: v for k, v in options.items() if k in getattr(self.op, "options", ())}
        result = self.op(*(values[n] for n in self.ins), **wanted)
        if len(self.outs) == 1:
            values[self.outs[0]] = result
        else:
            if not isinstance(result, tuple) or len(result) != len(self.outs):
                raise PipelineError(f"op '{self.label}' made {type(result).__name__}, not {len(self.outs)} values")
            values.update(zip(self.outs, result))


class ModelStep:
    """``{"model": name, "in": {input: value}, "out": {output: value}, ...}``: one model call.

    Options: ``const`` feeds fixed inputs (e.g. a sample rate); ``each`` runs the model once per array
    of a list value (batches of different shapes) and makes lists; ``state`` ({input: output}) with
    ``scan`` runs the model along axis 0 of its inputs one item at a time on a fresh stream, carrying
    the recurrent state from each call to the next, and concatenates the outputs.
    """

    stage = "model"

    def __init__(self, index: int, step: dict[str, Any], models: ModelSpecs | None) -> None:
        self.model = step["model"]
        self.label = f"model:{self.model}"
        where = f"graph step {index} (model '{self.model}')"
        feeds, fetch = step.get("in"), step.get("out")
        if not isinstance(feeds, dict) or not feeds or not isinstance(fetch, dict) or not fetch:
            raise PipelineError(f"{where} needs 'in' {{model input: value}} and 'out' {{model output: value}}")
        self.feeds: dict[str, str] = dict(feeds)
        self.fetch: dict[str, str] = dict(fetch)
        self.const = {k: np.asarray(v) for k, v in (step.get("const") or {}).items()}
        self.state: dict[str, str] = dict(step.get("state") or {})
        self.scan = bool(step.get("scan", False))
        self.each = bool(step.get("each", False))
        if self.state and not self.scan:
            raise PipelineError(f"{where} has 'state' but not 'scan': a stateful call runs along its inputs")
        self.ins = list(self.feeds.values())
        self.outs = list(self.fetch.values())
        if models is not None:
            self._check(where, models)

    def _check(self, where: str, models: ModelSpecs) -> None:
        if self.model not in models:
            raise PipelineError(f"{where}: the package has no model '{self.model}'; it has {sorted(models)}")
        inputs, outputs = (({s.name: s for s in specs}) for specs in models[self.model])
        given = [*self.feeds, *self.const, *self.state]
        unknown = [n for n in given if n not in inputs]
        if unknown:
            raise PipelineError(f"{where} feeds {unknown}, which are not inputs of the model; inputs: {list(inputs)}")
        missing = [n for n in inputs if n not in given]
        if missing:
            raise PipelineError(f"{where} does not feed model input(s) {missing}; add them to 'in', 'const' or 'state'")
        bad = [n for n in [*self.fetch, *self.state.values()] if n not in outputs]
        if bad:
            raise PipelineError(f"{where} reads {bad}, which are not outputs of the model; outputs: {list(outputs)}")
        for name, value in self.const.items():
            spec = inputs[name]
            self.const[name] = value.astype(spec.np_dtype)

    def run(self, values: dict[str, Any], session: Any, options: dict[str, Any]) -> None:
        model = session.model(self.model)
        args = {name: values[v] for name, v in self.feeds.items()}
        if self.scan:
            results = self._scan(model, args)
        elif self.each:
            lengths = {len(a) for a in args.values()}
            if len(lengths) != 1:
                raise PipelineError(f"{self.label}: 'each' needs lists of one length, got lengths {sorted(lengths)}")
            runs = [model.run({**dict(zip(args, items)), **self.const}) for items in zip(*args.values())]
            results = {o: [r[o] for r in runs] for o in self.fetch}
        elif args and all(len(a) == 0 for a in args.values()):
            results = self._empty(model)  # e.g. no text boxes: nothing to classify, and engines differ on batch 0
        else:
            results = model.run({**args, **self.const})
        for output, value_name in self.fetch.items():
            values[value_name] = results[output]

    def _empty(self, model: Any) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in model.outputs}
        return {o: np.zeros((0, *specs[o].concrete(1)[1:]), specs[o].np_dtype) for o in self.fetch}

    def _scan(self, model: Any, args: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stream = model.stream(state=self.state)
        count = {len(a) for a in args.values()}
        if len(count) != 1:
            raise PipelineError(f"{self.label}: 'scan' inputs must have one length along axis 0, got {sorted(count)}")
        steps = [stream.run({**{n: a[i : i + 1] for n, a in args.items()}, **self.const}) for i in range(count.pop())]
        if not steps:
            return {o: np.zeros((0,), np.float32) for o in self.fetch}
        return {o: np.concatenate([s[o] for s in steps]) for o in self.fetch}


class GraphPipeline:
    """A pipeline whose spec has a ``graph``: steps in order, each reading values made before it."""

    def __init__(self, spec: dict[str, Any], models: ModelSpecs | None = None) -> None:
        from . import ops  # noqa: F401  (registers the ops)

        self.spec = spec
        graph = spec.get("graph")
        if not isinstance(graph, list) or not graph:
            raise PipelineError("a pipeline 'graph' must be a non-empty list of steps")
        self.steps: list[OpStep | ModelStep] = []
        made = {RAW: "the raw input"}
        for i, step in enumerate(graph):
            if not isinstance(step, dict) or ("op" in step) == ("model" in step):
                raise PipelineError(f"graph step {i} must be an object with exactly one of 'op' or 'model': {step!r}")
            built: OpStep | ModelStep = ModelStep(i, step, models) if "model" in step else OpStep(i, step)
            for name in built.ins:
                if name not in made:
                    raise PipelineError(
                        f"graph step {i} ({built.label}) reads '{name}', which no earlier step makes; "
                        f"values made so far: {sorted(made)}"
                    )
            for name in built.outs:
                if name in made:
                    raise PipelineError(f"graph step {i} ({built.label}) makes '{name}' again; {made[name]} made it")
                made[name] = f"step {i} ({built.label})"
            self.steps.append(built)
        self.result = spec.get("result")
        if self.result not in made:
            raise PipelineError(
                f"the pipeline's 'result' {self.result!r} is not made by any step; made: {sorted(made)}"
            )
        self._local = threading.local()

    @property
    def model_names(self) -> list[str]:
        return sorted({s.model for s in self.steps if isinstance(s, ModelStep)})

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds spent in pre-processing, models and post-processing by this thread's last run."""
        return dict(getattr(self._local, "timings", {}))

    def main_step(self) -> ModelStep | None:
        """The first call of the primary model, or None when another model is called before it."""
        for step in self.steps:
            if isinstance(step, ModelStep):
                return step if step.model == MAIN else None
        return None

    def main_inputs(self, raw: Any) -> tuple[dict[str, Any], ModelStep]:
        """What the primary model's first call receives for ``raw`` (the op steps before it run), and that call."""
        step = self.main_step()
        if step is None:
            raise PipelineError(f"the pipeline does not call model '{MAIN}' before its other models")
        values: dict[str, Any] = {RAW: raw}
        for op in self.steps[: self.steps.index(step)]:
            op.run(values, None, {})
        return {name: values[v] for name, v in step.feeds.items()}, step

    def preprocess(self, raw: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The primary model's feeds for ``raw`` plus its constants, as the classic pipeline's ``preprocess`` gives
        them: what calibration and `luodi verify --data` run on images."""
        feeds, step = self.main_inputs(raw)
        if step.scan or step.each:
            raise PipelineError(
                f"the pipeline calls model '{MAIN}' {'frame by frame with its state' if step.scan else 'per item'}"
                ", so a raw input gives no single set of feeds; give model-ready tensors instead "
                "(an .npz with one array per input)"
            )
        return {**feeds, **step.const}, {}

    def run(self, raw: Any, session: Any, **options: Any) -> Any:
        """``raw`` (or each item of a list of them) through the graph; a list gives a list of results."""
        if isinstance(raw, list):
            if not raw:
                raise PipelineError("predict() got an empty list; give at least one input")
            results, total = [], {"pre": 0.0, "model": 0.0, "post": 0.0}
            for item in raw:
                results.append(self.run(item, session, **options))
                for k, v in self._local.timings.items():
                    total[k] += v
            self._local.timings = total
            return results
        values: dict[str, Any] = {RAW: raw}
        timings = {"pre": 0.0, "model": 0.0, "post": 0.0}
        for step in self.steps:
            start = time.perf_counter()
            step.run(values, session, options)
            timings[step.stage] += time.perf_counter() - start
        self._local.timings = timings
        return values[self.result]
