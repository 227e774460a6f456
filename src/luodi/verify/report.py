"""`luodi verify`: run a package's targets on a dataset and compare each with another target (the float
reference by default): max abs error, cosine and SNR per output, top-1 agreement over the set, pass or FAIL.

Samples are compared one by one, so inputs of different shapes (a package's representative shape sets) can be
mixed; a wrong output shape or a NaN is a failed row, never an exception. It runs targets through the backends'
load/run only; it never changes a package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import get_backend, open_engine
from ..errors import BackendError, LuodiError
from ..tensor import dequantise_outputs, quantise_feeds
from . import compare, failure_reason

# The reference evaluator runs EfficientNet-Lite0 at about a second an image; past this many samples the canonical
# float graph runs on onnxruntime fp32 instead (compile-time verification pins it to the evaluator within 1e-4).
REFERENCE_EVALUATOR_MAX = 8

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class OutputReport:
    """One target's output over the samples: worst error, lowest cosine and SNR; ``problem`` says why it failed
    when that is not a number (a wrong shape, NaN, a target that could not run)."""

    target: str
    output: str
    max_abs: float
    cosine: float
    snr_db: float
    agreement: float | None
    passed: bool = True
    problem: str = ""
    compared: bool = True  # False when no numbers were computed (wrong shape, NaN, a target that did not run)


def _label(t: dict[str, Any]) -> str:
    return f"{t['backend']}:{t['precision']}"


def _run_all(engine: Any, what: str, feeds: list[Feeds]) -> list[dict[str, np.ndarray]]:
    """Every sample through ``engine``; an engine's own exception becomes a BackendError naming the inputs."""
    results = []
    for f in feeds:
        try:
            results.append(engine.run(f))
        except LuodiError:
            raise
        except Exception as exc:  # e.g. the reference evaluator on an input it cannot take
            shapes = {n: list(a.shape) for n, a in f.items()}
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise BackendError(f"{what} failed to run on inputs {shapes}: {type(exc).__name__}: {detail}") from exc
    return results


def _run(package: Any, target: dict[str, Any], feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    backend, artifact = get_backend(target["backend"]), package.artifact(target)
    backend.probe(artifact, package.representative_shapes)  # a malformed engine file must not kill `verify`
    ins, outs = package.target_io(target)  # a target with int8 I/O: float in, float out, as Session gives them
    feeds = [quantise_feeds(f, ins) for f in feeds]
    with open_engine(backend, artifact) as engine:
        return [dequantise_outputs(o, outs) for o in _run_all(engine, _label(target), feeds)]


def reference_outputs(package: Any, feeds: list[Feeds]) -> tuple[list[dict[str, np.ndarray]], str]:
    """The canonical float graph's outputs and what ran it."""
    if len(feeds) <= REFERENCE_EVALUATOR_MAX:
        backend, ran = get_backend("reference"), "reference evaluator"
    else:
        backend, ran = get_backend("onnxruntime"), "canonical graph on onnxruntime fp32"
    with open_engine(backend, package.model()) as engine:
        return _run_all(engine, f"the reference ({ran})", feeds), ran


def verify_package(
    package: Any,
    feeds: list[Feeds],
    targets: list[dict[str, Any]] | None = None,
    against: str = "reference",
) -> tuple[list[OutputReport], str]:
    """Per target and output, the error against ``against`` (a target label or "reference") over ``feeds``."""
    if against == "reference":
        base, ran = reference_outputs(package, feeds)
    else:
        from ..arguments import parse_target

        base_target = package.find_target(*parse_target(against))
        against = _label(base_target)  # "openvino" -> "openvino:fp32", so the target is not compared with itself
        base, ran = _run(package, base_target, feeds), against
    reports = []
    for t in targets if targets is not None else package.targets:
        if _label(t) == against or (t["backend"] == "reference" and against == "reference"):
            continue
        try:
            got = _run(package, t, feeds)
        except LuodiError as exc:
            reports.append(failed_row(_label(t), "(all)", f"could not run: {exc}"))
            continue
        except Exception as exc:  # an engine's own error loading its file: this target's row, the others still run
            detail = (str(exc).strip().splitlines() or [""])[-1][:300]
            reports.append(failed_row(_label(t), "(all)", f"could not be loaded: {type(exc).__name__}: {detail}"))
            continue
        for name in base[0]:
            reports.append(compare_output(_label(t), name, [b[name] for b in base], [g.get(name) for g in got]))
    return reports, ran


def failed_row(target: str, output: str, problem: str) -> OutputReport:
    return OutputReport(target, output, float("inf"), 0.0, float("-inf"), None, False, problem, compared=False)


def compare_output(target: str, name: str, refs: list[np.ndarray], gots: list[Any]) -> OutputReport:
    """One output over the samples, judged as compile-time verification judges it (:func:`luodi.verify.compare`:
    shapes first, integers exactly at fp32, NaN/Inf at the same places); SNR and top-1 agreement added."""
    precision = target.rpartition(":")[2]
    worst = compare([{name: r} for r in refs], [{} if g is None else {name: g} for g in gots])[name]
    problem = failure_reason({name: worst}, precision).removeprefix(f"output '{name}': ")
    if worst.mismatch or worst.max_abs is None or worst.cosine is None:
        return failed_row(target, name, problem)
    snr, hits, rows = float("inf"), 0, 0
    for ref, got in zip(refs, gots):
        ref, got = np.asarray(ref), np.asarray(got)
        finite = np.isfinite(ref) & np.isfinite(got) if ref.dtype.kind == "f" else np.ones(ref.shape, bool)
        snr = min(snr, _snr_db(ref[finite], got[finite]))
        if ref.ndim == 2 and ref.shape[1] > 1:
            hits += int((ref.argmax(1) == got.argmax(1)).sum())
            rows += ref.shape[0]
    passed = worst.passes(precision)
    agreement = hits / rows if rows else None
    return OutputReport(target, name, worst.max_abs, worst.cosine, snr, agreement, passed, "" if passed else problem)


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    from ..quant.sensitivity import snr_db

    return snr_db(ref, got) if ref.size else float("inf")


def data_feeds(package: Any, data: str, limit: int | None = None) -> list[Feeds]:
    """Feeds for `luodi verify --data`: ``data`` as calibration reads it (images through the package's pipeline,
    .npy, .npz, a dataset); an .npz whose arrays stack whole samples along a new first axis (each array one
    dimension more than its input: what a model with unbatched or recurrent-state inputs needs); or, for a
    pipeline that runs the model frame by frame with its state (a VAD), .wav files, each frame a sample with the
    state the stream really has there. Inputs the data leaves out get the value the pipeline fixes; each feed is
    checked against the input specs."""
    from ..errors import InputError, MissingInputError
    from ..quant.data import _spread, load_feeds
    from .representative import pipeline_constants

    specs = {s.name: s for s in package.inputs}
    stacked = _stacked_npz(data, specs)
    audio = _audio_files(data) if stacked is None and _stream_step(package) is not None else []
    if stacked is not None:
        count = len(next(iter(stacked.values())))
        feeds = [{n: a[i] for n, a in stacked.items()} for i in _spread(count, limit)]
    elif audio:
        feeds = _stream_feeds(package, audio)
        feeds = [feeds[i] for i in _spread(len(feeds), limit)]
    else:
        feeds = load_feeds(data, package.inputs, package.pipeline, limit, "verification")
    if not feeds:
        raise InputError(f"verification data '{data}' holds no samples")
    constants = pipeline_constants(package)
    for i, feed in enumerate(feeds):
        for name, value in constants.items():
            if stacked is None or name not in feed:  # images through the pipeline carry its constant, untyped
                feed[name] = value
        missing = [n for n in specs if n not in feed]
        if missing:
            raise MissingInputError(f"verification data '{data}' gives no value for input(s) {missing} (sample {i})")
        for name, value in list(feed.items()):
            if name not in specs:
                raise InputError(f"verification data '{data}' has '{name}', not an input; inputs: {list(specs)}")
            feed[name] = specs[name].as_array(value)
            specs[name].check(feed[name])
    return feeds


def _stacked_npz(data: str, specs: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz that stacks samples along a new axis 0 (each one dim more than its input), else None."""

    from ..arrays import load_npz
    from ..errors import InputError

    if not str(data).endswith(".npz") or not Path(data).is_file():
        return None
    arrays = load_npz(data, "verification data")
    given = {n: a for n, a in arrays.items() if n in specs}
    if not given or any(a.ndim != len(specs[n].shape) + 1 for n, a in given.items()):
        return None
    if len({len(a) for a in given.values()}) != 1:
        raise InputError(f"verification data {data}: the arrays hold different numbers of samples along axis 0")
    return given


AUDIO_SUFFIXES = {".wav"}


def _stream_step(package: Any) -> Any:
    """The pipeline's first call of the main model when it scans frames with a recurrent state, else None."""
    pipe = package.pipeline
    if not pipe or "graph" not in pipe:
        return None
    from ..pipeline import Pipeline

    step = Pipeline.from_spec(pipe, package.inputs).main_step()
    return step if step is not None and step.scan and step.state else None


def _audio_files(data: str) -> list[Path]:
    path = Path(data)
    if path.is_file():
        return [path] if path.suffix.lower() in AUDIO_SUFFIXES else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    return []


def _stream_feeds(package: Any, files: list[Path]) -> list[Feeds]:
    """One feed per frame of each file, as the pipeline frames it, with the state the stream carries into that
    frame: the canonical graph runs each file through from a zero state (on onnxruntime, as the reference does
    for large sets), so a target is checked on the states it meets in use, not only on zeros."""
    from ..pipeline import Pipeline

    pipe = Pipeline.from_spec(package.pipeline, package.inputs)
    specs = {s.name: s for s in package.inputs}
    feeds: list[Feeds] = []
    with open_engine("onnxruntime", package.model()) as engine:
        for file in files:
            args, step = pipe.main_inputs(str(file))
            constants = {n: np.asarray(v, dtype=specs[n].np_dtype) for n, v in step.const.items() if n in specs}
            state = {i: np.zeros(specs[i].concrete(1), specs[i].np_dtype) for i in step.state}
            for k in range(min(len(a) for a in args.values())):
                feed = {**{n: np.asarray(a[k : k + 1]) for n, a in args.items()}, **state, **constants}
                feeds.append(feed)
                outputs = _run_all(engine, "the canonical graph", [feed])[0]
                state = {i: outputs[o] for i, o in step.state.items()}
    return feeds
