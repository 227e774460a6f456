"""luodi.compile: source -> graph passes -> one artifact per target -> verification -> a package written atomically.

The per-model work is job.py's, verification reference.py's, int8 calibration int8.py's; this module checks the
arguments, runs them in order and writes the manifest.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import arguments
from .._version import __version__
from ..backends import get_backend
from ..errors import CompileError, InputError
from ..package import FORMAT, SCHEMA_VERSION, Package, write_package
from ..package.archive import MODEL
from ..progress import Progress
from ..tensor import TensorSpec, specs_from_onnx
from ..timing import host_key, measure_many
from ..verify import TOLERANCES
from .int8 import ptq_for, quantise_for, vendor_quantise
from .job import CompileRun, ModelDone, ModelJob
from .load_source import load_source
from .models import check_pipeline, model_member
from .passes import run_passes
from .reference import same_kind
from .shapes import check_samples, parse_input_shapes

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
    int8_io: bool = False,
    target_options: Mapping[str, Mapping[str, Any]] | None = None,
    estimate: Sequence[str] | None = None,
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
    With ``int8_io`` every int8 target reads and writes the quantised integers instead of float (what an integer-only
    device sees): its own ``io`` specs in the manifest carry each tensor's integer dtype, scale and zero point, and a
    Session quantises float inputs and dequantises outputs at the boundary (see docs/cli.md, "int8 I/O").

    ``target_options`` gives a backend's engine options by backend name, e.g. ``{"rknn": {"platform": "rk3566"}}``
    (CLI: ``--option rknn.platform=rk3566``); each backend refuses a key it does not take (``luodi backends``).

    ``estimate`` names device configurations to estimate each target that can be estimated on (litert:int8 on an
    Arm Ethos-U NPU through Vela: ``["ethos-u55-128"]``); each is stored under the target's ``estimate``.

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
    src = load_source(model, name=name)
    src.model, src.pipeline, pass_records = run_passes(src.model, passes, src.pipeline)
    for rec in pass_records:
        say(f"pass {rec.name}: {rec.nodes_before} -> {rec.nodes_after} nodes; {'; '.join(rec.notes)}")
    wanted = [parse_target(t) for t in targets]
    if not wanted:
        raise CompileError("no targets given; add at least one, e.g. --target onnxruntime")
    if not isinstance(int8_io, bool):
        raise CompileError(f"int8_io must be True or False, not {int8_io!r}")
    if int8_io and not any(p == "int8" for _, p in wanted):
        raise CompileError("int8_io applies to int8 targets and none is given; add e.g. --target onnxruntime:int8")
    if len(set(wanted)) != len(wanted):
        raise CompileError(f"a target is listed twice in {list(targets)}")
    backends = {b: get_backend(b) for b, _ in wanted}
    for b in backends.values():
        b.require()  # every engine must be here before any work is done
    for b, p in wanted:
        if p not in backends[b].precisions:  # a typo in the command line, not a target that failed
            raise CompileError(f"{b} has no precision '{p}'; choose one of {list(backends[b].precisions)}")

    configs = _estimates(estimate, wanted, backends)
    inputs, outputs = specs_from_onnx(src.model)  # once; every backend gets them in CompileOptions
    check_pipeline(src, inputs, outputs)  # a bad pipeline spec fails before any work is done
    given_samples = check_samples(samples, inputs) if samples is not None else None
    jobs = [ModelJob("main", src, inputs, outputs, "", MODEL, given_samples, parse_input_shapes(input_shapes, inputs))]
    for sub_name, sub in src.models.items():
        jobs.append(ModelJob(sub_name, sub, *specs_from_onnx(sub.model), f"models/{sub_name}/", model_member(sub_name)))
    members: dict[str, bytes] = {}
    by_sha: dict[str, str] = {}
    extra = _target_options(target_options, backends)
    for b, p in wanted:  # a misspelt or invalid option fails here, not after calibration and the other targets
        backends[b].check_compile_options(extra.get(b, {}), p)
    run = CompileRun(wanted, backends, members, by_sha, verify, strict, steps, say, int8_io=int8_io, extra=extra)
    run.estimate = configs
    with steps:
        if any(p == "int8" for _, p in wanted) or calibration is not None or preprocess is not None:
            with steps.step("calibrating for int8"):
                run.ptq = ptq_for(
                    src, inputs, wanted, calibration, calib_method, calib_samples, validation, say, preprocess
                )
            run.quantise = lambda backend, float_precision=None: quantise_for(
                run.ptq, backend, max_disagreement, fallback, float_precision
            )
            run.vendor = lambda backend, model, opts: vendor_quantise(
                run.ptq, backend, model, opts, max_disagreement, fallback, say
            )
        done = [run.model(job) for job in jobs]
        main = done[0]
        if not main.artifacts:  # nothing compiled at all (a target that compiled but failed verification is kept)
            first = run.first_error
            if len(main.entries) == 1 and first is not None:  # one target: its own error, as the backend raised it
                raise same_kind(first, f"{first}; nothing was written") from first
            raise CompileError(
                "no target could be compiled, so nothing was written: "
                + "; ".join(f"{e['backend']}:{e['precision']}: {e['reason']}" for e in main.entries)
            )
        if tune:
            tune_targets(main, inputs, steps, say)

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


def tune_targets(main: ModelDone, inputs: list[TensorSpec], steps: Progress, say: Log) -> None:
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


def _target_options(given: Any, backends: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``target_options`` checked: a mapping of backend names (among the targets) to mappings of option values."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise CompileError(f"target_options must map a backend name to its options, not {type(given).__name__}")
    out = {}
    for name, opts in given.items():
        if name not in backends:
            raise CompileError(f"target_options names backend '{name}', which no target uses: {sorted(backends)}")
        if not isinstance(opts, Mapping):
            raise CompileError(f"target_options['{name}'] must map option names to values")
        out[str(name)] = dict(opts)
    return out


def _toolchain(backends: dict[str, Any]) -> dict[str, str]:
    import onnx

    versions = {"luodi": __version__, "python": platform.python_version(), "onnx": onnx.__version__}
    for name, b in backends.items():
        versions[name] = b.available().version
    return versions


def _estimates(estimate: Sequence[str] | None, wanted: list[tuple[str, str]], backends: dict[str, Any]) -> list[str]:
    """The estimate configurations, checked before any work: a target must take them and the estimator be here."""
    if estimate is None:
        return []
    configs = list(dict.fromkeys(arguments.names("estimate", estimate, "['ethos-u55-128']")))
    able = [(b, p) for b, p in wanted if p in getattr(backends[b], "estimates", ())]
    if configs and not able:
        raise CompileError(
            "--estimate applies to targets compiled for a device this host only estimates (litert:int8, on Arm "
            "Ethos-U through Vela) and none is given; add --target litert:int8"
        )
    for b in dict.fromkeys(b for b, _ in able):
        for config in configs:
            backends[b].check_estimate(config)
    return configs
