"""The offline compiler: source model -> canonical graph -> one artifact per target -> verified package.

It runs on the host and may use heavy libraries; what it writes must run with numpy + one engine.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .. import __version__, arguments
from ..backends import CompileOptions, LoadOptions, get_backend
from ..backends.base import Artifact
from ..errors import CompileError, InputError, LuodiError, VerificationError
from ..frontends import SourceModel, load_model
from ..package import FORMAT, SCHEMA_VERSION, Package, write_package
from ..package.archive import MODEL, target_dir
from ..selection import host_key, measure_many
from ..tensor import specs_from_onnx
from ..verify import TOLERANCES, compare, sample_inputs, verification_record
from .entry import store_model, target_entry
from .models import check_pipeline, compile_models
from .passes import run_passes

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
    samples: Sequence[dict[str, np.ndarray]] | None = None,
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
) -> Package:
    """Compile ``model`` for every target and write a verified .luodi package to ``output``.

    ``model`` is a path to an .onnx file, ``"zoo:<name>"``, an ``onnx.ModelProto`` or a
    ``SourceModel``. Each target is ``BACKEND`` or ``BACKEND:PRECISION``. With ``verify`` every
    target runs the sample inputs and is compared with the ``reference`` backend; the results are
    stored in the manifest. With ``strict`` a target outside its tolerance aborts the compile and
    nothing is written.

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
    a pipeline (and replaces the pipeline's pre-processing for them when it has one).
    With ``fallback`` the most sensitive layers are kept in float
    until the budget holds; a target that still misses it fails the compile and nothing is written.
    """
    say = log or (lambda _msg: None)
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

    inputs, outputs = specs_from_onnx(src.model)
    check_pipeline(src, inputs, outputs)  # a bad pipeline spec fails before any work is done
    members: dict[str, bytes] = {}
    by_sha: dict[str, str] = {}
    store_model(src.model, MODEL, members, by_sha)  # over 2 GB: graph + MODEL.data (ONNX external data)

    ptq = _ptq_for(src, inputs, wanted, calibration, calib_method, calib_samples, validation, say, preprocess)
    # Compile every target first: an unsupported operator is reported before the slow reference run.
    compiled = []
    for backend_name, precision in wanted:
        say(f"compiling {backend_name}:{precision}")
        backend = backends[backend_name]
        target_model, quantization = src.model, None
        if precision == "int8":
            target_model, quantization = _quantise_for(ptq, backend, max_disagreement, fallback)
        artifact = backend.compile(target_model, CompileOptions(precision=precision, source=src))
        entry = target_entry(backend, precision, artifact, "", members, by_sha)
        if quantization is not None:
            # The QDQ graph itself, engine-neutral: what `luodi verify --layerwise` marks and what re-simulates.
            member = store_model(target_model, f"{target_dir(backend_name, precision)}/qdq.onnx", members, by_sha)
            entry["quantization"] = {**quantization, "model": member}
        compiled.append((backend, artifact, entry))

    if verify:
        if samples is not None:
            feeds = list(samples)
        elif ptq is not None:  # int8 is judged on real data: random inputs fall outside the calibrated ranges
            feeds = ptq.validation_feeds[:4]
        else:
            feeds = _samples_for(src, inputs)
        from ..quant.source import quantised_format, tolerance_class

        source_format = quantised_format(src.model)  # a pre-quantised source: engines may run it in int8 kernels
        say(f"running the reference on {len(feeds)} sample input(s)")
        reference_outputs = _reference_outputs(src.model, feeds)
        for backend, artifact, entry in compiled:
            label = f"{entry['backend']}:{entry['precision']}"
            say(f"verifying {label} against reference")
            tolerance = tolerance_class(entry["precision"], source_format, backend.int8_policy is not None)
            record = _verify(backend, artifact, feeds, reference_outputs, tolerance)
            if source_format:
                record["source"] = f"pre-quantised ({source_format})"
                record["tolerance_class"] = tolerance
            entry["verification"] = record
            if strict and not record["passed"]:
                raise VerificationError(
                    f"target {label} {_failure(record)}; nothing was written. "
                    "Drop --strict to keep it with the failure recorded."
                )
    if tune:
        timed = {
            id(entry): (artifact, entry)
            for _, artifact, entry in compiled
            if entry.get("verification", {}).get("passed", True) and entry["backend"] != "reference"
        }
        say(f"timing {len(timed)} target(s) side by side")
        ms, failed = measure_many({k: a for k, (a, _) in timed.items()}, inputs, shapes=_example_shapes(src))
        for k, (_, entry) in timed.items():
            if k in ms:
                entry["timing"] = {"host": host_key(), "device": "cpu", "median_ms": round(ms[k], 4)}
            else:
                say(f"{entry['backend']}:{entry['precision']} could not be timed: {failed[k]}")
    target_entries = [entry for _, _, entry in compiled]
    models = compile_models(src, wanted, backends, members, by_sha, verify=verify, strict=strict, say=say)

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
        "targets": target_entries,
        "toolchain": _toolchain(backends),
    }
    if models:
        manifest["models"] = models
    if _example_shapes(src):
        manifest["example_shapes"] = _example_shapes(src)  # what auto-selection times the targets on
    path = write_package(output, manifest, members)
    say(f"wrote {path}")
    return Package(path)


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
    """The QDQ graph for ``backend`` and its record; the compile-time gate: a target outside the budget stops
    the compile before anything is written."""
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
            + "; nothing was written. Loosen --accuracy-budget, try another --calib-method, or "
            + ("allow the fallback" if not fallback else "drop this int8 target")
        )
    return qdq, record


def _failure(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"failed to run: {record['error']}"
    name, worst = max(record["outputs"].items(), key=lambda kv: kv[1]["max_abs"])
    return (
        f"is outside its tolerance on output '{name}' "
        f"(max abs error {worst['max_abs']:.3g}, cosine {worst['cosine']:.6f})"
    )


def _example_shapes(src: SourceModel) -> dict[str, list[int]]:
    """Input shapes of the first sample feeds, for models whose free dims cannot be timed at 1 (detectors, OCR)."""
    first = src.samples[0] if src.samples and isinstance(src.samples[0], dict) else {}
    return {name: list(np.shape(value)) for name, value in first.items()}


def _samples_for(src: SourceModel, inputs: list) -> list[dict[str, np.ndarray]]:
    if src.samples and all(isinstance(s, dict) for s in src.samples):
        return list(src.samples)  # already model feeds (multi-model and stateful pipelines give these)
    if src.samples and src.pipeline:
        from ..pipeline import Pipeline

        pipe = Pipeline.from_spec(src.pipeline, inputs)
        return [pipe.preprocess(raw)[0] for raw in src.samples]
    return sample_inputs(inputs, count=2)


def _reference_outputs(model: Any, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from ..backends.reference import ReferenceEngine

    # The evaluator straight on the model: no serialise/parse round trip, one copy of the weights (they matter
    # for a model of gigabytes). Targets are still compared with exactly what the reference backend runs.
    engine = ReferenceEngine(model)
    try:
        return [engine.run(f) for f in feeds]
    finally:
        engine.close()


def _verify(
    backend: Any,
    artifact: Artifact,
    feeds: list[dict[str, np.ndarray]],
    reference_outputs: list[dict[str, np.ndarray]],
    precision: str,
) -> dict[str, Any]:
    try:
        engine = backend.load(artifact, LoadOptions())
    except LuodiError as exc:
        return {"against": "reference", "passed": False, "error": str(exc)}
    try:
        got = [engine.run(f) for f in feeds]
    except Exception as exc:  # an engine failing at run time is a verification result, not a crash
        return {"against": "reference", "passed": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        engine.close()
    return verification_record(precision, compare(reference_outputs, got), len(feeds))


def _toolchain(backends: dict[str, Any]) -> dict[str, str]:
    import onnx

    versions = {"luodi": __version__, "python": platform.python_version(), "onnx": onnx.__version__}
    for name, b in backends.items():
        versions[name] = b.available().version
    return versions


__all__ = ["compile", "parse_target"]
