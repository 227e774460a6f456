"""The offline compiler: source model -> canonical graph -> one artifact per target -> verified package.

It runs on the host and may use heavy libraries; what it writes must run with numpy + one engine.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__, arguments, onnx_io
from ..backends import CompileOptions, get_backend, open_engine
from ..backends.base import Artifact
from ..errors import CompileError, InputError, LuodiError, VerificationError
from ..frontends import SourceModel, load_model
from ..package import FORMAT, SCHEMA_VERSION, Package, write_package
from ..package.archive import MODEL, target_dir
from ..package.schema import FOLDED_NORMALIZATION
from ..progress import Progress
from ..selection import host_key, measure_many
from ..tensor import TensorSpec, specs_from_onnx
from ..verify import TOLERANCES, Domain, compare, sample_inputs, verification_record
from .domains import input_domains
from .entry import store_model, target_entry
from .models import check_pipeline, model_member
from .passes import run_passes
from .shapes import GivenDim, ShapePlan, check_samples, describe, parse_input_shapes, plan_shapes

Log = Callable[[str], None]


def parse_target(spec: str) -> tuple[str, str]:
    """``"onnxruntime"`` -> ("onnxruntime", "fp32"); ``"openvino:bf16"`` -> ("openvino", "bf16")."""
    backend, _, precision = spec.partition(":")
    if not backend:
        raise CompileError(f"empty target in '{spec}'; write BACKEND or BACKEND:PRECISION, e.g. onnxruntime:fp32")
    return backend, precision or "fp32"


def compile(  # noqa: A001 - the field's word for it
    model: Any,
    output: str | os.PathLike[str],
    targets: Iterable[str] = ("onnxruntime",),
    *,
    name: str | None = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    input_shapes: Mapping[str, Any] | None = None,
    verify: bool = True,
    strict: bool = False,
    accuracy_budget: str = "fp32",
    tune: bool = False,
    passes: str | Sequence[str] | None = "default",
    calibration: Any = None,
    calib_method: str = "minmax",
    calib_samples: int | None = None,
    validation: Any = None,
    preprocess: str | dict[str, Any] | None = None,
    fallback: bool = True,
    log: Log | None = None,
    progress: Progress | None = None,
) -> Package:
    """Compile ``model`` for every target and write a verified .luodi package to ``output``.

    ``model`` is a path to an .onnx file, ``"zoo:<name>"``, an ``onnx.ModelProto`` or a
    ``SourceModel``. Each target is ``BACKEND`` or ``BACKEND:PRECISION``.

    Shapes: ``input_shapes`` maps an input name to its shape, ``"1x3x224x224"`` or ``[1, 3, 224, 224]``; a
    dynamic axis may be a range ``"32..640"`` / ``(32, 640)`` (it stays dynamic, the range is recorded) or a size
    (the size it is converted and verified at). ``samples`` are real inputs (dicts of arrays keyed by input
    name). The package records representative shape sets (``Package.representative_shapes``): the samples'
    shapes, else the given ones, else the model's own examples, else chosen sizes (see luodi.compiler.shapes),
    and one more set giving every dynamic axis a second size. Every backend converts at these shapes.

    With ``verify`` every target runs the samples and inputs generated at every representative shape set (values
    in each input's domain: pixels, indices within what they index, masks) and is compared with the ``reference``
    evaluator: shapes first, integers exactly, NaN/Inf where the reference has them. A target that fails to
    compile or to verify is kept in the package with ``status: "failed"`` and its ``reason``; the others are
    written. With ``strict`` the first failure aborts the compile and nothing is written.

    ``accuracy_budget`` (a precision class: fp32, fp16, bf16, int8) is how far from the reference a
    target may be for ``backend="auto"`` to choose it: with the default "fp32" a bf16 target is never
    picked silently. ``tune`` measures every target's latency on this host and stores it, so that
    ``auto`` does not have to measure at first load here.

    ``passes`` are the graph passes run on the canonical graph before any target is compiled
    (``"default"``: see ``luodi.compiler.passes.DEFAULT``; ``None`` for none, or a list of names).
    What each did is stored in the manifest under ``passes`` and shown by ``luodi compile --passes``.

    int8 targets (``BACKEND:int8``) are quantised by luodi.quant for that backend's policy from
    ``calibration`` (a folder of images run through the model's pipeline, an .npy/.npz file, an array, a list
    of feeds or a dataset name such as "ai-benchmark"), ``calib_samples`` of them, with observer
    ``calib_method`` (minmax, percentile, entropy, mse). Each int8 target's top-1 agreement with the float
    model is measured on the engine itself over ``validation`` (else the calibration samples) and must stay
    within the budget: ``accuracy_budget`` may be a top-1 disagreement such as "1%" (auto may then pick int8
    targets), else 1% applies to int8 targets. ``preprocess`` ("resize=224,224;layout=nchw;scale=1/255;mean=...;
    std=...", see luodi.quant.preprocess) turns calibration and validation images into tensors for a model without
    a pipeline (and replaces the pipeline's pre-processing for them when it has one). With ``fallback`` the most
    sensitive layers are kept in float until the budget holds; a target that still misses it is recorded as failed.

    ``progress`` (a luodi.progress.Progress) shows each long step; ``log`` gets one line per step.
    """
    say = log or (lambda _msg: None)
    steps = progress if progress is not None else Progress(quiet=True)
    output = arguments.path("output", output)
    targets = arguments.names("targets", targets, "['onnxruntime', 'openvino:int8']")
    samples = None if samples is None else arguments.feed_dicts("samples", samples)
    calib_samples = arguments.optional_count("calib_samples", calib_samples)
    if not isinstance(passes, str) and passes is not None:  # a str is "default", "none" or one pass's name
        passes = arguments.names("passes", passes, "['fold-constants']")
    accuracy_budget = arguments.text("accuracy_budget", accuracy_budget)
    max_disagreement = None
    if accuracy_budget not in TOLERANCES:
        from ..quant import parse_budget

        try:  # "1%": int8 targets within it may be chosen by auto
            max_disagreement = parse_budget(accuracy_budget)
        except InputError as exc:
            raise CompileError(str(exc)) from None
        accuracy_budget = "int8"
    src = load_model(model, name=name)
    src.model, src.pipeline, pass_records = run_passes(src.model, passes, src.pipeline)
    for rec in pass_records:
        say(f"pass {rec.name}: {rec.nodes_before} -> {rec.nodes_after} nodes; {'; '.join(rec.notes)}")
    wanted = [parse_target(t) for t in targets]
    if not wanted:
        raise CompileError("no targets given; add at least one, e.g. --target onnxruntime")
    if len(set(wanted)) != len(wanted):
        raise CompileError(f"a target is listed twice in {list(targets)}")
    backends = {b: get_backend(b) for b, _ in wanted}
    for b in backends.values():
        b.require()  # every engine must be here before any work is done
    for b, p in wanted:
        if p not in backends[b].precisions:  # a typo in the command line, not a target that failed
            raise CompileError(f"{b} has no precision '{p}'; choose one of {list(backends[b].precisions)}")

    inputs, outputs = specs_from_onnx(src.model)  # once; every backend gets them in CompileOptions
    check_pipeline(src, inputs, outputs)  # a bad pipeline spec fails before any work is done
    given_samples = check_samples(samples, inputs) if samples is not None else None
    jobs = [ModelJob("main", src, inputs, outputs, "", MODEL, given_samples, parse_input_shapes(input_shapes, inputs))]
    for sub_name, sub in src.models.items():
        jobs.append(ModelJob(sub_name, sub, *specs_from_onnx(sub.model), f"models/{sub_name}/", model_member(sub_name)))
    members: dict[str, bytes] = {}
    by_sha: dict[str, str] = {}
    run = CompileRun(wanted, backends, members, by_sha, verify, strict, steps, say)
    with steps:
        if any(p == "int8" for _, p in wanted) or calibration is not None or preprocess is not None:
            with steps.step("calibrating for int8"):
                run.ptq = _ptq_for(
                    src, inputs, wanted, calibration, calib_method, calib_samples, validation, say, preprocess
                )
            run.quantise = lambda backend: _quantise_for(run.ptq, backend, max_disagreement, fallback)
        done = [run.model(job) for job in jobs]
        main = done[0]
        if not main.artifacts:  # nothing compiled at all (a target that compiled but failed verification is kept)
            first = run.first_error
            if len(main.entries) == 1 and first is not None:  # one target: its own error, as the backend raised it
                raise _same_kind(first, f"{first}; nothing was written") from first
            raise CompileError(
                "no target could be compiled, so nothing was written: "
                + "; ".join(f"{e['backend']}:{e['precision']}: {e['reason']}" for e in main.entries)
            )
        if tune:
            _tune(main, inputs, steps, say)

    manifest = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "name": src.name,
        "version": src.version,
        "description": src.description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "pipeline": src.pipeline,
        "passes": [r.to_dict() for r in pass_records],
        "accuracy_budget": accuracy_budget,
        "targets": main.entries,
        "shapes": main.plan.to_manifest(main.domains),
        "example_shapes": {n: list(s) for n, s in main.plan.primary.items()},  # what luodi before 0.2 reads
        "toolchain": _toolchain(backends),
    }
    if len(done) > 1:
        manifest["models"] = {
            d.job.name: {
                "model": d.member,
                "description": d.job.src.description,
                "inputs": [s.to_dict() for s in d.job.inputs],
                "outputs": [s.to_dict() for s in d.job.outputs],
                "targets": d.entries,
                "shapes": d.plan.to_manifest(d.domains),
            }
            for d in done[1:]
        }
    path = write_package(output, manifest, members)
    say(f"wrote {path}")
    return Package(path)


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
    quantise: Callable[[Any], tuple[Any, dict]] | None = None
    first_error: BaseException | None = None
    """The first exception a target of the primary model failed with: what a compile with no target raises."""

    def model(self, job: ModelJob) -> ModelDone:
        """Store ``job``'s graph, choose its shapes, run the reference once, then compile and verify each target."""
        member = store_model(job.src.model, job.member, self.members, self.by_sha)
        job.data = self.members.get(member) if not onnx_io.is_large(job.src.model) else None
        examples = [] if job.samples else _examples(job.src, job.inputs)
        plan = plan_shapes(job.inputs, given=job.given, samples=job.samples or [], examples=examples)
        real = job.samples or examples
        domains = input_domains(job.src.model, job.inputs, job.src.pipeline, real)
        checks: list[Check] = []
        if self.verify:
            checks = _checks(job, plan, real, domains)
            with self.steps.step(f"running the reference{_of(job)}", total=len(checks)) as step:
                checks = _run_reference(job, plan, checks, step)
            if plan.fallbacks and not any(plan.generated):  # the all-at-once second set could not run
                checks += self._fallback_checks(job, plan, domains)
            self.say(f"reference{_of(job)} ran at {len(plan.sets)} shape set(s), {len(checks)} input(s)")
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
            if artifact is None:
                continue
            artifacts[id(entry)] = artifact
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
                    int8_checks = _run_reference(job, plan, [Check(f, 0, False) for f in self.ptq.validation_feeds[:4]])
                used = int8_checks
            # A pre-quantised source: engines that run QDQ in int8 kernels are judged as int8 targets.
            tolerance = tolerance_class(precision, source_format, backend.int8_policy is not None)
            with self.steps.step(f"verifying {label}", total=len(used)) as step:
                record = _verify(backend, artifact, used, tolerance, step)
            record["against"] = job.reference
            if source_format:
                record["source"] = f"pre-quantised ({source_format})"
                record["tolerance_class"] = tolerance
            entry["verification"] = record
            entry["status"] = "verified" if record["passed"] else "failed"
            if not record["passed"]:
                entry["reason"] = _failure(record)
                self.say(f"{label} failed verification: {entry['reason']}")
                if self.strict:
                    raise VerificationError(
                        f"target {label} {entry['reason']}; nothing was written. "
                        "Drop --strict to keep it with the failure recorded."
                    )
        return ModelDone(job, member, plan, domains, entries, artifacts)

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
        with self.steps.step(f"running the reference{_of(job)}, one axis at a time", total=len(checks)) as step:
            return _run_reference(job, plan, checks, step)

    def _compile(
        self, job: ModelJob, backend: Any, precision: str, label: str, options: dict[str, Any]
    ) -> tuple[dict[str, Any], Artifact | None]:
        """The target's entry and artifact; on any failure (an unsupported operator, a converter crash, the int8
        gate) a failed entry with the reason, and no artifact."""
        what = "quantising (calibrated ranges, fallback search) and converting" if precision == "int8" else "converting"
        with self.steps.step(f"{what} for {label}"):
            try:
                target_model, quantization = job.src.model, None
                if precision == "int8" and self.quantise is not None and not job.prefix:
                    target_model, quantization = self.quantise(backend)
                data = job.data if target_model is job.src.model else None
                opts = CompileOptions(precision=precision, source=job.src, model_bytes=data, **options)
                artifact = backend.compile(target_model, opts)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a converter may crash in any way; it is this target's result
                reason = _one_line(exc)
                if self.strict:
                    raise _same_kind(
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
                return entry, None
        entry = target_entry(backend, precision, artifact, job.prefix, self.members, self.by_sha)
        if quantization is not None:
            # The QDQ graph itself, engine-neutral: what `luodi verify --layerwise` marks and what re-simulates.
            where = f"{job.prefix}{target_dir(backend.name, precision)}/qdq.onnx"
            entry["quantization"] = {
                **quantization,
                "model": store_model(target_model, where, self.members, self.by_sha),
            }
        return entry, artifact


@dataclass
class Check:
    """One verification input, the shape set it belongs to, whether luodi generated it; its reference outputs."""

    feeds: dict[str, np.ndarray]
    shape_set: int
    generated: bool
    reference: dict[str, np.ndarray] | None = None


def _of(job: ModelJob) -> str:
    return f" for model '{job.name}'" if job.prefix else ""


def _same_kind(exc: BaseException, message: str) -> LuodiError:
    """A LuodiError of ``exc``'s own class (an UnsupportedOpError stays one) saying ``message``; else CompileError."""
    if isinstance(exc, LuodiError):
        try:
            return type(exc)(message)
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            pass
    return CompileError(message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not isinstance(exc, LuodiError):
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= 500 else line[:497] + "..."


def _shapes_of(feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(int(d) for d in np.shape(a)) for n, a in feeds.items()}


def _checks(
    job: ModelJob, plan: ShapePlan, real: list[dict[str, np.ndarray]], domains: dict[str, Domain]
) -> list[Check]:
    """The real inputs at each shape set they match, and generated ones at every set no real input covers."""
    checks = []
    for k, shape_set in enumerate(plan.sets):
        matching = [f for f in real if _shapes_of(f) == shape_set]
        if matching:
            checks += [Check(f, k, False) for f in matching]
        else:
            count = 2 if k == 0 else 1
            checks += [
                Check(f, k, True) for f in sample_inputs(job.inputs, count, seed=k, shapes=shape_set, domains=domains)
            ]
    return checks


def _run_reference(job: ModelJob, plan: ShapePlan, checks: list[Check], step: Any = None) -> list[Check]:
    """The reference's outputs for every check, once. A generated shape set the model cannot run is dropped (with a
    note); the samples' or the primary set failing is a CompileError saying which shapes and what to give."""
    from ..backends.reference import ReferenceEngine

    # The evaluator straight on the model: no serialise/parse round trip, one copy of the weights (they matter
    # for a model of gigabytes). Targets are still compared with exactly what the reference backend runs.
    try:
        engine: Any = ReferenceEngine(job.src.model)
    except CompileError as exc:
        engine = _onnxruntime_reference(job.src.model, exc)
        job.reference = f"onnxruntime fp32 (the reference evaluator cannot run this model: {_one_line(exc)})"
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
                where = describe(_shapes_of(check.feeds))
                if not check.generated or check.shape_set == 0:
                    raise CompileError(
                        f"the reference cannot run model '{job.src.name}' at {where}: {_one_line(exc)}; give the "
                        "shapes it runs at (input_shapes=, CLI --input-shape NAME=1x3x640x640) or real inputs "
                        "(samples=, CLI --sample FILE.npz)"
                    ) from exc
                dropped[check.shape_set] = _one_line(exc)
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
            return _one_line(exc)
        return ""


def _verify(backend: Any, artifact: Artifact, checks: list[Check], precision: str, step: Any) -> dict[str, Any]:
    """Run every check on the target and compare with the reference; a failure to load or run is a result."""
    try:
        engine = open_engine(backend, artifact)
    except Exception as exc:  # noqa: BLE001 - an engine failing to load is a verification result
        return {"against": "reference", "passed": False, "error": f"cannot load: {_one_line(exc)}"}
    got = []
    with engine:
        for check in checks:
            try:
                got.append(engine.run(check.feeds))
            except Exception as exc:  # noqa: BLE001 - an engine failing at run time is a result, not a crash
                where = describe(_shapes_of(check.feeds))
                return {"against": "reference", "passed": False, "error": f"fails at {where}: {_one_line(exc)}"}
            step.advance()
    shapes = []
    for c in checks:
        if _shapes_of(c.feeds) not in shapes:
            shapes.append(_shapes_of(c.feeds))
    return verification_record(precision, compare([c.reference for c in checks], got), len(checks), shapes=shapes)


def _tune(main: ModelDone, inputs: list[TensorSpec], steps: Progress, say: Log) -> None:
    timed = {
        k: (artifact, entry)
        for entry in main.entries
        if (k := id(entry)) in main.artifacts and entry.get("status") != "failed" and entry["backend"] != "reference"
        for artifact in (main.artifacts[k],)
    }
    with steps.step(f"timing {len(timed)} target(s) side by side"):
        primary = {n: list(s) for n, s in main.plan.primary.items()}
        ms, failed = measure_many({k: a for k, (a, _) in timed.items()}, inputs, shapes=primary, domains=main.domains)
    for k, (_, entry) in timed.items():
        if k in ms:
            entry["timing"] = {"host": host_key(), "device": "cpu", "median_ms": round(ms[k], 4)}
        else:
            say(f"{entry['backend']}:{entry['precision']} could not be timed: {failed[k]}")


def _ptq_for(
    src: SourceModel,
    inputs: list,
    wanted: list,
    calibration: Any,
    method: str,
    samples: Any,
    validation: Any,
    say: Log,
    preprocess: str | dict[str, Any] | None = None,
) -> Any:
    """One calibration shared by every int8 target (None when there is none)."""
    if not any(p == "int8" for _, p in wanted):
        if calibration is not None or preprocess is not None:
            what = "calibration data was" if calibration is not None else "--preprocess (for calibration images) was"
            raise CompileError(f"{what} given but no target is int8; add e.g. --target onnxruntime:int8")
        return None
    if calibration is None:
        raise CompileError(
            "int8 targets need calibration data: pass calibration= (CLI: --calibration DIR_OR_DATASET), e.g. a "
            "folder of representative images or the dataset 'ai-benchmark'"
        )
    from ..quant import PTQ
    from ..quant.preprocess import pipeline_spec

    try:
        pipeline = pipeline_spec(preprocess, inputs) if preprocess is not None else src.pipeline
    except InputError as exc:
        raise CompileError(str(exc)) from None
    return PTQ(
        src.model,
        inputs,
        calibration,
        pipeline=pipeline,
        method=method,
        samples=samples,
        validation=validation,
        log=say,
    )


def _quantise_for(ptq: Any, backend: Any, max_disagreement: float | None, fallback: bool) -> tuple[Any, dict]:
    """The QDQ graph for ``backend`` and its record; the compile-time gate: a VerificationError for a target
    outside the budget (recorded as failed, or with ``strict`` the end of the compile)."""
    from ..quant import DEFAULT_MAX_DISAGREEMENT

    budget = DEFAULT_MAX_DISAGREEMENT if max_disagreement is None else max_disagreement
    qdq, record = ptq.for_backend(backend, budget, allow_fallback=fallback)
    if not record["passed"]:
        floats = len(record["float_layers"])
        raise VerificationError(
            f"target {backend.name}:int8 agrees with the float model on top-1 for {record['agreement']:.2%} of "
            f"{record['validation']['samples']} validation samples ({record['validation']['data']}), below the "
            f"{1 - budget:.2%} the budget {budget:.2%} allows"
            + (f", even with {floats} layers kept in float" if floats else "")
            + ". Loosen --accuracy-budget, try another --calib-method, or "
            + ("allow the fallback" if not fallback else "drop this int8 target")
        )
    return qdq, record


def _failure(record: dict[str, Any]) -> str:
    """The one-line reason a verification record failed."""
    if "error" in record:
        return f"failed to run: {record['error']}"
    return record.get("reason") or "is outside its tolerance"


def _examples(src: SourceModel, inputs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """The model's own example inputs as feeds: a zoo model's samples, through its pipeline when they are raw."""
    if src.samples and all(isinstance(s, dict) for s in src.samples):
        return [dict(s) for s in src.samples]  # already model feeds (multi-model and stateful pipelines give these)
    if src.samples and src.pipeline:
        from ..pipeline import Pipeline

        pipe = Pipeline.from_spec(src.pipeline, inputs)
        return [pipe.preprocess(raw)[0] for raw in src.samples]
    return []


def _toolchain(backends: dict[str, Any]) -> dict[str, str]:
    import onnx

    versions = {"luodi": __version__, "python": platform.python_version(), "onnx": onnx.__version__}
    for name, b in backends.items():
        versions[name] = b.available().version
    return versions


__all__ = ["compile", "parse_target"]
