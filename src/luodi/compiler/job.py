"""One compile's work per model: store its graph, choose its shapes, run the reference once, then compile and verify
each target (CompileRun.model); the primary model and every further model of a multi-model package alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import onnx_io
from ..backends import CompileOptions
from ..backends.contract import Artifact
from ..errors import VerificationError
from ..package.archive import target_dir
from ..package.schema import FOLDED_NORMALIZATION
from ..progress import Progress
from ..source import SourceModel
from ..tensor import TensorSpec
from ..verify import Domain, sample_inputs
from .domains import input_domains
from .entry import store_model, target_entry
from .reference import Check, checks_for, failure, one_line, run_reference, same_kind, verify_target
from .shapes import GivenDim, ShapePlan, plan_shapes

Log = Callable[[str], None]


@dataclass
class ModelJob:
    """One model of the package to compile: the primary ("main") or a further model of a multi-model pipeline."""

    name: str
    src: SourceModel
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    prefix: str
    """Where its targets go in the package: "" for the primary model, ``models/<name>/`` for a further one."""
    member: str
    samples: list[dict[str, np.ndarray]] | None = None
    given: dict[str, list[GivenDim]] = field(default_factory=dict)
    reference: str = "reference"
    data: bytes | None = None
    """The graph serialised once (the package member's bytes), for every consumer; None over 2 GB."""
    """What the targets were compared with: the reference evaluator, or onnxruntime when the evaluator cannot run
    the model (an operator outside the ONNX standard, e.g. com.microsoft's): recorded as the records' ``against``."""


@dataclass
class ModelDone:
    job: ModelJob
    member: str
    plan: ShapePlan
    domains: dict[str, Domain]
    entries: list[dict[str, Any]]
    artifacts: dict[int, Artifact]
    """The compiled artifacts by id() of their entry, for --tune."""


@dataclass
class CompileRun:
    """What every model of one compile shares: the targets, the package members, the options, the reporting."""

    wanted: list[tuple[str, str]]
    backends: dict[str, Any]
    members: dict[str, bytes]
    by_sha: dict[str, str]
    verify: bool
    strict: bool
    steps: Progress
    say: Log
    ptq: Any = None
    quantise: Callable[[Any, str | None], tuple[Any, dict]] | None = None
    vendor: Callable[[Any, Any, CompileOptions], tuple[Artifact, dict]] | None = None
    """For a backend that quantises itself: its int8 artifact and record (int8.vendor_quantise)."""
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Engine options by backend name (``CompileOptions.extra``)."""
    int8_io: bool = False
    """int8 targets read and write the quantised integers (luodi.quant.io.integer_io), recorded as the target's io."""
    estimate: list[str] = field(default_factory=list)
    """Device configurations to estimate the targets that can be estimated on (``Backend.estimates``)."""
    first_error: BaseException | None = None
    """The first exception a target of the primary model failed with: what a compile with no target raises."""

    def model(self, job: ModelJob) -> ModelDone:
        """Store ``job``'s graph, choose its shapes, run the reference once, then compile and verify each target."""
        member = store_model(job.src.model, job.member, self.members, self.by_sha)
        job.data = self.members.get(member) if not onnx_io.is_large(job.src.model) else None
        examples = [] if job.samples else examples_of(job.src, job.inputs)
        plan = plan_shapes(job.inputs, given=job.given, samples=job.samples or [], examples=examples)
        real = job.samples or examples
        domains = input_domains(job.src.model, job.inputs, job.src.pipeline, real)
        checks: list[Check] = []
        if self.verify:
            checks = checks_for(job, plan, real, domains)
            with self.steps.step(f"running the reference{of_model(job)}", total=len(checks)) as step:
                checks = run_reference(job, plan, checks, step)
            if plan.fallbacks and not any(plan.generated):  # the all-at-once second set could not run
                checks += self._fallback_checks(job, plan, domains)
            self.say(f"reference{of_model(job)} ran at {len(plan.sets)} shape set(s), {len(checks)} input(s)")
        int8_checks: list[Check] | None = None
        from ..quant.source import quantised_format, tolerance_class

        source_format = quantised_format(job.src.model)  # a pre-quantised source: engines may run it in int8 kernels
        options = {
            "inputs": tuple(job.inputs),
            "outputs": tuple(job.outputs),
            "shapes": tuple(plan.sets),
            "input_normalization": (job.src.pipeline or {}).get(FOLDED_NORMALIZATION),
        }
        entries, artifacts = [], {}
        for backend_name, precision in self.wanted:
            backend = self.backends[backend_name]
            label = f"{backend_name}:{precision}" + (f" ({job.name})" if job.prefix else "")
            entry, artifact = self._compile(job, backend, precision, label, options)
            entries.append(entry)
            boundary = None
            if "io" in entry:
                boundary = [TensorSpec.from_dict(d) for d in entry["io"]["inputs"]]
                boundary = (boundary, [TensorSpec.from_dict(d) for d in entry["io"]["outputs"]])
            if artifact is None:
                continue
            artifacts[id(entry)] = artifact
            if self.estimate and precision in getattr(backend, "estimates", ()):
                entry["estimate"] = self._estimate(backend, artifact, label)
            if not self.verify:
                entry["status"] = "unverified"
                continue
            if backend_name == "reference":  # the yardstick itself: recorded as such, never compared with itself
                entry["verification"] = {"against": "reference", "reference": True, "passed": True, "outputs": {}}
                entry["verification"]["samples"] = len(checks)
                entry["status"] = "verified"
                continue
            used = checks
            if precision == "int8" and self.ptq is not None and not job.prefix:
                if int8_checks is None:  # int8 is judged on real data: random inputs fall outside calibrated ranges
                    int8_checks = run_reference(job, plan, [Check(f, 0, False) for f in self.ptq.validation_feeds[:4]])
                used = int8_checks
            if getattr(backend, "static_shapes", False):  # built at one shape set: checked at that one only
                used = [c for c in used if built_for(artifact, c.feeds)]
            # A pre-quantised source: engines that run QDQ in int8 kernels are judged as int8 targets.
            tolerance = tolerance_class(precision, source_format, backend.int8_policy is not None)
            with self.steps.step(f"verifying {label}", total=len(used)) as step:
                record = verify_target(backend, artifact, used, tolerance, step, boundary)
            record["against"] = job.reference
            if source_format:
                record["source"] = f"pre-quantised ({source_format})"
                record["tolerance_class"] = tolerance
            entry["verification"] = record
            entry["status"] = "verified" if record["passed"] else "failed"
            if not record["passed"]:
                entry["reason"] = failure(record)
                self.say(f"{label} failed verification: {entry['reason']}")
                if self.strict:
                    raise VerificationError(
                        f"target {label} {entry['reason']}; nothing was written. "
                        "Drop --strict to keep it with the failure recorded."
                    )
        return ModelDone(job, member, plan, domains, entries, artifacts)

    def _estimate(self, backend: Any, artifact: Artifact, label: str) -> dict[str, Any]:
        """Each configuration's estimate of ``artifact``; one that fails is recorded with its reason (an estimate,
        not a target: the target stands)."""
        out: dict[str, Any] = {}
        for config in self.estimate:
            with self.steps.step(f"estimating {label} on {config}"):
                try:
                    out[config] = backend.estimate(artifact, config)
                except Exception as exc:  # noqa: BLE001 - the estimator fails in its own ways; recorded
                    out[config] = {"error": one_line(exc)}
                    self.say(f"{label}: no estimate on {config}: {one_line(exc)}")
                    continue
            e = out[config]
            self.say(
                f"{label} on {config}: {e.get('inference_ms')} ms estimated, {e.get('npu_ops')} NPU / "
                f"{e.get('cpu_ops')} CPU operators"
            )
        return out

    def _fallback_checks(self, job: ModelJob, plan: ShapePlan, domains: dict[str, Domain]) -> list[Check]:
        """Give each dynamic axis its second size alone; keep the sets the reference runs."""
        first = len(plan.sets)
        for shapes in plan.fallbacks:
            plan.sets.append(shapes)
            plan.generated.append(True)
        checks = [
            Check(feeds, k, True)
            for k in range(first, len(plan.sets))
            for feeds in sample_inputs(job.inputs, 1, seed=k, shapes=plan.sets[k], domains=domains)
        ]
        with self.steps.step(f"running the reference{of_model(job)}, one axis at a time", total=len(checks)) as step:
            return run_reference(job, plan, checks, step)

    def _compile(
        self, job: ModelJob, backend: Any, precision: str, label: str, options: dict[str, Any]
    ) -> tuple[dict[str, Any], Artifact | None]:
        """The target's entry and artifact; on any failure (an unsupported operator, a converter crash, the int8
        gate) a failed entry with the reason, and no artifact."""
        what = "quantising (calibrated ranges, fallback search) and converting" if precision == "int8" else "converting"
        with self.steps.step(f"{what} for {label}"):
            try:
                target_model, quantization, io, qdq = job.src.model, None, None, None
                extra = self.extra.get(backend.name, {})
                vendor = precision == "int8" and backend.quantises_itself(extra)
                if vendor and self.ptq is not None and not job.prefix:  # its toolkit quantises, from our samples
                    options = {
                        **options,
                        "calibration": tuple(self.ptq.feeds),
                        "int8_io": self.int8_io,
                        "int8_ranges": self.ptq.trained_ranges,
                    }
                elif precision == "int8" and self.quantise is not None and not job.prefix:
                    target_model, quantization = self.quantise(backend, extra.get("float_precision"))
                    qdq = target_model
                    if "float_precision" in extra:  # "auto" or a precision: the one the fallback's choice runs in
                        extra = {**extra, "float_precision": quantization["float_precision"]}
                    if self.int8_io:
                        target_model, io = integer_boundary(qdq, job.inputs, job.outputs)
                        options = {**options, "inputs": tuple(io[0]), "outputs": tuple(io[1])}
                data = job.data if target_model is job.src.model else None
                opts = CompileOptions(precision=precision, source=job.src, model_bytes=data, extra=extra, **options)
                if vendor and self.vendor is not None and not job.prefix:
                    artifact, quantization = self.vendor(backend, target_model, opts)
                    io = artifact.io
                else:
                    artifact = backend.compile(target_model, opts)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a converter may crash in any way; it is this target's result
                reason = one_line(exc)
                if self.strict:
                    raise same_kind(
                        exc,
                        f"target {label} could not be compiled: {reason}; nothing was written. "
                        "Drop --strict to write the other targets with this one recorded as failed.",
                    ) from exc
                if not job.prefix and self.first_error is None:
                    self.first_error = exc
                self.say(f"{label} failed: {reason}")
                entry = {
                    "backend": backend.name,
                    "precision": precision,
                    "files": {},
                    "options": {},
                    "engine_version": backend.available().version,
                    "status": "failed",
                    "reason": reason,
                }
                if isinstance(getattr(exc, "record", None), dict):  # the int8 gate's: what the fallback measured
                    entry["quantization"] = exc.record
                return entry, None
        entry = target_entry(backend, precision, artifact, job.prefix, self.members, self.by_sha)
        if quantization is not None and qdq is None:  # quantised by the engine's own toolkit: no QDQ graph
            entry["quantization"] = quantization
        elif quantization is not None:
            # The QDQ graph itself, engine-neutral: what `luodi verify --layerwise` marks and what re-simulates.
            where = f"{job.prefix}{target_dir(backend.name, precision)}/qdq.onnx"
            entry["quantization"] = {
                **quantization,
                "model": store_model(qdq, where, self.members, self.by_sha),
            }
        if io is not None:
            entry["io"] = {"inputs": [s.to_dict() for s in io[0]], "outputs": [s.to_dict() for s in io[1]]}
        return entry, artifact


def built_for(artifact: Artifact, feeds: dict[str, np.ndarray]) -> bool:
    """Whether ``feeds`` have the shapes a static-shape artifact was built at (any size of the first axis)."""
    built = artifact.options.get("shapes") or {}
    return all(n in built and tuple(a.shape[1:]) == tuple(built[n][1:]) for n, a in feeds.items())


def integer_boundary(
    qdq: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[Any, tuple[list[TensorSpec], list[TensorSpec]]]:
    """``qdq`` with integer inputs and outputs (luodi.quant.io.integer_io) and the specs the device sees: the model's
    own, with the integer dtype, scale and zero point of each tensor made integer."""
    from ..quant.io import integer_io

    model, ins, outs = integer_io(qdq)

    def device(specs: list[TensorSpec], params: dict[str, tuple[float, int, str]]) -> list[TensorSpec]:
        return [
            TensorSpec(s.name, params[s.name][2], s.shape, params[s.name][0], params[s.name][1])
            if s.name in params
            else s
            for s in specs
        ]

    return model, (device(inputs, ins), device(outputs, outs))


def of_model(job: ModelJob) -> str:
    return f" for model '{job.name}'" if job.prefix else ""


def examples_of(src: SourceModel, inputs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """The model's own example inputs as feeds: a zoo model's samples, through its pipeline when they are raw."""
    if src.samples and all(isinstance(s, dict) for s in src.samples):
        return [dict(s) for s in src.samples]  # already model feeds (multi-model and stateful pipelines give these)
    if src.samples and src.pipeline:
        from ..pipeline import Pipeline

        pipe = Pipeline.from_spec(src.pipeline, inputs)
        return [pipe.preprocess(raw)[0] for raw in src.samples]
    return []
