"""Verification at compile time: the reference's outputs for every check, once, and each target compared with them.

The reference is ``onnx.reference.ReferenceEvaluator`` on the canonical graph (onnxruntime where the evaluator
cannot run the model); generated shape sets the model cannot run are dropped with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import onnx_io
from ..backends import open_engine
from ..backends.contract import Artifact
from ..errors import CompileError, LuodiError
from ..tensor import dequantise_outputs, quantise_feeds
from ..verify import Domain, compare, sample_inputs, verification_record
from .shapes import ShapePlan, describe


@dataclass
class Check:
    """One verification input, the shape set it belongs to, whether luodi generated it; its reference outputs."""

    feeds: dict[str, np.ndarray]
    shape_set: int
    generated: bool
    reference: dict[str, np.ndarray] | None = None


def same_kind(exc: BaseException, message: str) -> LuodiError:
    """A LuodiError of ``exc``'s own class (an UnsupportedOpError stays one) saying ``message``; else CompileError."""
    if isinstance(exc, LuodiError):
        try:
            return type(exc)(message)
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            pass
    return CompileError(message)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not isinstance(exc, LuodiError):
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= 500 else line[:497] + "..."


def shapes_of(feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(int(d) for d in np.shape(a)) for n, a in feeds.items()}


def checks_for(job: Any, plan: ShapePlan, real: list[dict[str, np.ndarray]], domains: dict[str, Domain]) -> list[Check]:
    """The real inputs at each shape set they match, and generated ones at every set no real input covers."""
    checks = []
    for k, shape_set in enumerate(plan.sets):
        matching = [f for f in real if shapes_of(f) == shape_set]
        if matching:
            checks += [Check(f, k, False) for f in matching]
        else:
            count = 2 if k == 0 else 1
            checks += [
                Check(f, k, True) for f in sample_inputs(job.inputs, count, seed=k, shapes=shape_set, domains=domains)
            ]
    return checks


def run_reference(job: Any, plan: ShapePlan, checks: list[Check], step: Any = None) -> list[Check]:
    """The reference's outputs for every check, once. A generated shape set the model cannot run is dropped (with a
    note); the samples' or the primary set failing is a CompileError saying which shapes and what to give."""
    from ..backends.reference import ReferenceEngine

    # The evaluator straight on the model: no serialise/parse round trip, one copy of the weights (they matter
    # for a model of gigabytes). Targets are still compared with exactly what the reference backend runs.
    try:
        engine: Any = ReferenceEngine(job.src.model)
    except CompileError as exc:
        engine = _onnxruntime_reference(job.src.model, exc)
        job.reference = f"onnxruntime fp32 (the reference evaluator cannot run this model: {one_line(exc)})"
    probe = _Probe(job.src.model, job.data)
    dropped: dict[int, str] = {}
    try:
        for check in checks:
            if check.shape_set in dropped:
                continue
            if check.generated and check.shape_set > 0:
                why = probe.fails(check.feeds)
                if why:
                    dropped[check.shape_set] = why
                    continue
            try:
                check.reference = engine.run(check.feeds)
            except Exception as exc:  # noqa: BLE001 - the evaluator raises whatever the failing op raises
                where = describe(shapes_of(check.feeds))
                if not check.generated or check.shape_set == 0:
                    raise CompileError(
                        f"the reference cannot run model '{job.src.name}' at {where}: {one_line(exc)}; give the "
                        "shapes it runs at (input_shapes=, CLI --input-shape NAME=1x3x640x640) or real inputs "
                        "(samples=, CLI --sample FILE.npz)"
                    ) from exc
                dropped[check.shape_set] = one_line(exc)
            if step is not None:
                step.advance()
    finally:
        engine.close()
    for k in sorted(dropped, reverse=True):
        plan.drop(k, f"the model cannot run it ({dropped[k]})")
    renumber = {old: new for new, old in enumerate(k for k in range(len(plan.sets) + len(dropped)) if k not in dropped)}
    return [
        Check(c.feeds, renumber[c.shape_set], c.generated, c.reference) for c in checks if c.shape_set not in dropped
    ]


def _onnxruntime_reference(model: Any, why: CompileError) -> Any:
    """onnxruntime on the canonical graph, for a model the evaluator cannot load (operators outside the ONNX
    standard, which only onnxruntime runs); the evaluator's own error when onnxruntime cannot load it either."""
    try:
        return open_engine("onnxruntime", model)
    except Exception:  # noqa: BLE001 - neither can run it: the evaluator's reason is the one to give
        raise why from None


class _Probe:
    """onnxruntime on the graph, asked first whether a generated shape set runs at all: it answers in milliseconds
    where the reference evaluator may run a whole network before the node that cannot take the size."""

    def __init__(self, model: Any, data: bytes | None = None) -> None:
        self._model, self._data, self._session, self._tried = model, data, None, False

    def fails(self, feeds: dict[str, np.ndarray]) -> str:
        """Why the model cannot run ``feeds`` ("" when it can, or when onnxruntime cannot tell)."""
        if not self._tried:
            self._tried = True
            if not onnx_io.is_large(self._model):
                try:
                    import onnxruntime as ort

                    so = ort.SessionOptions()
                    so.log_severity_level = 3
                    data = self._data or self._model.SerializeToString()
                    self._session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
                except Exception:  # noqa: BLE001 - an operator onnxruntime lacks: the reference alone decides
                    self._session = None
        if self._session is None:
            return ""
        try:
            self._session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for a shape it cannot run
            return one_line(exc)
        return ""


def verify_target(
    backend: Any, artifact: Artifact, checks: list[Check], precision: str, step: Any, boundary: Any = None
) -> dict[str, Any]:
    """Run every check on the target and compare with the reference; a failure to load or run is a result.

    ``boundary`` (the target's input and output specs, for a target with int8 I/O): float inputs are quantised and
    integer outputs dequantised with each tensor's scale and zero point, as Session does, before comparing."""
    ins, outs = boundary or ([], [])
    try:
        engine = open_engine(backend, artifact)
    except Exception as exc:  # noqa: BLE001 - an engine failing to load is a verification result
        return {"against": "reference", "passed": False, "error": f"cannot load: {one_line(exc)}"}
    got = []
    with engine:
        for check in checks:
            try:
                got.append(dequantise_outputs(engine.run(quantise_feeds(check.feeds, ins)), outs))
            except Exception as exc:  # noqa: BLE001 - an engine failing at run time is a result, not a crash
                where = describe(shapes_of(check.feeds))
                return {"against": "reference", "passed": False, "error": f"fails at {where}: {one_line(exc)}"}
            step.advance()
    shapes = []
    for c in checks:
        if shapes_of(c.feeds) not in shapes:
            shapes.append(shapes_of(c.feeds))
    return verification_record(precision, compare([c.reference for c in checks], got), len(checks), shapes=shapes)


def failure(record: dict[str, Any]) -> str:
    """The one-line reason a verification record failed."""
    if "error" in record:
        return f"failed to run: {record['error']}"
    return record.get("reason") or "is outside its tolerance"
