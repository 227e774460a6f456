"""Which compiled target a Session runs: by name, or "auto" = the fastest measured within the accuracy budget.

Timings are measured on this host (at compile time with tune=True, or at first load) and cached per host
and package hash (luodi.timing); every choice comes with the reasons for it. The timing round of "auto" loads
each candidate once, with the session's options, and the winner's engine is the one the session runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from .arguments import parse_target  # noqa: F401  (luodi.selection.parse_target, as before)
from .backends import Artifact, Engine, LoadOptions, get_backend, load_engine
from .backends.base import check_options, file_only_refusal
from .errors import (
    BackendUnavailableError,
    FailedTargetError,
    LuodiError,
    OptionError,
    PackageError,
)
from .package import Package
from .paths import cache_dir  # noqa: F401  (luodi.selection.cache_dir, as before)
from .timing import (  # noqa: F401  (luodi.selection.X as before)
    TIMING_RUNS,
    TimingCache,
    host_key,
    known_timings,
    label,
    measure,
    measure_many,
)
from .verify import TOLERANCES, OutputComparison

STATUSES = ("verified", "unverified", "failed")

log = logging.getLogger("luodi")


def target_status(target: dict[str, Any]) -> tuple[str, str]:
    """``(status, reason)``: "verified", "unverified" or "failed", and for a failed target why, in one line.

    The compiler records ``status``/``reason``; a package written before that has only its verification record,
    and one that did not pass counts as failed.
    """
    ver = target.get("verification")
    status = target.get("status")
    reason = str(target.get("reason") or "")
    if status == "failed" or (isinstance(ver, dict) and not ver.get("passed", False)):
        return "failed", reason or _verification_failure(ver)
    if status in STATUSES:
        return status, reason
    return ("unverified", "") if ver is None else ("verified", "")


def _verification_failure(ver: Any) -> str:
    """One line saying why a verification record did not pass."""
    if not isinstance(ver, dict):
        return "failed at compile time (no reason recorded)"
    if ver.get("error"):
        return f"failed to run during verification: {ver['error']}"
    if isinstance(ver.get("reason"), str) and ver["reason"]:
        return ver["reason"]
    tol = ver.get("tolerance") if isinstance(ver.get("tolerance"), dict) else TOLERANCES["fp32"]
    for name, r in (ver.get("outputs") or {}).items():
        if not isinstance(r, dict):
            continue
        if r.get("mismatch"):
            return f"output '{name}': {r['mismatch']}"
        max_abs, cosine, ref_max = (_number(r.get(k)) for k in ("max_abs", "cosine", "ref_max"))
        allowed = float(tol.get("rel_max_abs", 0.0)) * max(1.0, ref_max)
        if not (max_abs <= allowed and cosine >= float(tol.get("min_cosine", 1.0))):  # NaN fails too
            return f"output '{name}' outside its tolerance (max abs error {max_abs:.3g}, cosine {cosine:.6f})"
    return "verification did not pass"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def within_budget(target: dict[str, Any], budget: str) -> bool:
    """Whether the target's compile-time errors fit the tolerance of precision class ``budget``."""
    ver = target.get("verification")
    if ver is None or "outputs" not in ver:
        return False
    return all(OutputComparison(n, **r).passes(budget) for n, r in ver["outputs"].items())


@dataclass
class Choice:
    """The target to load, a sentence saying why, and (auto with ``load_options``) its engine, if the timing round
    loaded it: the winner is kept open, not loaded again."""

    target: dict[str, Any]
    reason: str
    engine: Engine | None = None


def select_target(
    package: Package,
    backend: str = "auto",
    precision: str | None = None,
    device: str = "cpu",
    accuracy_budget: str | None = None,
    allow_failed: bool = False,
) -> tuple[dict[str, Any], str]:
    """The target to load and a sentence saying why.

    ``backend`` is a name, ``BACKEND:PRECISION`` (as the CLI's ``--target``) or "auto", which never picks a
    target that failed at compile time. Asking for a failed target by name is a FailedTargetError naming its
    reason, unless ``allow_failed`` (for debugging: it loads with a logged warning).
    """
    choice = choose(package, backend, precision, device, accuracy_budget, allow_failed)
    return choice.target, choice.reason


def choose(
    package: Package,
    backend: str = "auto",
    precision: str | None = None,
    device: str = "cpu",
    accuracy_budget: str | None = None,
    allow_failed: bool = False,
    load_options: LoadOptions | None = None,
) -> Choice:
    """select_target's choice; with ``load_options`` the timing round of "auto" loads every candidate with them
    (each gets the engine options its backend takes: :func:`options_for`) and the winner's engine comes back open
    in ``Choice.engine``, the others closed. The package is read (decrypted) once per target."""
    backend, precision = parse_target(backend, precision)
    if backend != "auto":
        return Choice(*_by_name(package, backend, precision, allow_failed))

    budget = accuracy_budget or package.manifest.get("accuracy_budget", "fp32")
    if budget not in TOLERANCES:
        raise PackageError(f"unknown accuracy budget '{budget}'; choose one of {sorted(TOLERANCES)}")
    candidates, skipped = [], []
    for target in package.targets:
        name = label(target)
        if precision is not None and target["precision"] != precision:
            continue
        why = _unusable(target, device, budget, package.encrypted)
        if why:
            skipped.append(f"{name}: {why}")
        else:
            candidates.append(target)
    if not candidates:
        raise BackendUnavailableError(
            f"no target in {package.path} can run here on device '{device}' within the '{budget}' accuracy budget: "
            + ("; ".join(skipped) or "the package has no targets")
            + ". Run `luodi backends` to see what is installed."
        )
    note = f" (not considered: {'; '.join(skipped)})" if skipped else ""
    if len(candidates) == 1:
        only = candidates[0]
        return Choice(only, f"{label(only)}: the only target that runs here within budget '{budget}'{note}")

    opened: dict[str, Engine] = {}
    try:
        timings, failed = _timings(package, candidates, device, load_options, opened if load_options else None)
        skipped += [f"{name}: could not be loaded to time it ({why})" for name, why in failed.items()]
        note = f" (not considered: {'; '.join(skipped)})" if skipped else ""
        candidates = [t for t in candidates if label(t) in timings]
        if not candidates:
            raise BackendUnavailableError(f"no target in {package.path} could be loaded here: {'; '.join(skipped)}")
        best = min(candidates, key=lambda t: timings[label(t)])
        table = ", ".join(f"{label(t)} {timings[label(t)]:.2f} ms" for t in candidates)
        kept = opened.pop(label(best), None)
    finally:
        for engine in opened.values():  # the candidates that lost (all of them, on an error)
            engine.close()
    return Choice(best, f"{label(best)}: fastest measured on this host within budget '{budget}' ({table}){note}", kept)


def options_for(backend: str, options: LoadOptions) -> LoadOptions:
    """``options`` with only the engine options (``extra``) that ``backend`` declares: what each candidate of "auto"
    gets, since ``Session(options=...)`` may name options of several engines."""
    known = get_backend(backend).load_options
    if all(k in known for k in options.extra):
        return options
    return dataclasses.replace(options, extra={k: v for k, v in options.extra.items() if k in known})


def check_auto_options(package: Package, extra: dict[str, Any]) -> None:
    """For "auto": an OptionError for an engine option that no backend of the package's targets takes, or a value
    of the wrong type for one that does; an option only some of them take is fine (the others never see it)."""
    backends = []
    for name in dict.fromkeys(t["backend"] for t in package.targets if t["backend"] != "reference"):
        with contextlib.suppress(LuodiError):  # a backend not registered here is no candidate
            backends.append(get_backend(name))
    for key, value in extra.items():
        takers = [b for b in backends if key in b.load_options]
        if not takers:
            takes = "; ".join(f"{b.name}: {', '.join(sorted(b.load_options)) or 'none'}" for b in backends) or "none"
            raise OptionError(f"no backend of {package.path.name}'s targets has a load option '{key}' ({takes})")
        for b in takers:
            check_options(b.name, "load", {key: value}, b.load_options)


def open_target(
    package: Package,
    backend: str,
    precision: str | None,
    device: str,
    accuracy_budget: str | None,
    allow_failed: bool,
    options: LoadOptions,
    trust: Any = None,
    isolate: Any = False,
) -> tuple[Choice, LoadOptions]:
    """The Session's target of ``package``, loaded once, and the load options it got. "auto" times the candidates
    with ``options`` (each with the engine options its backend takes) and keeps the winner's engine; a target
    chosen otherwise is loaded here. An encrypted package's target must be on a backend that loads from memory."""
    auto = parse_target(backend, precision)[0] == "auto"
    if auto and options.extra:  # options of several engines: each candidate gets those it takes
        check_auto_options(package, options.extra)
    choice = choose(package, backend, precision, device, accuracy_budget, allow_failed, None if isolate else options)
    name = choice.target["backend"]
    if package.encrypted and not get_backend(name).in_memory:  # the decrypted files must stay off disk
        raise PackageError(file_only_refusal(name, str(package.path)))
    if auto:
        options = options_for(name, options)
    if choice.engine is None:
        choice.engine = load_target(package, choice.target, options, trusted=trust is not None, isolate=isolate)
    return choice, options


def load_target(
    package: Package | None,
    target: dict[str, Any] | Artifact,
    options: LoadOptions,
    *,
    trusted: bool = False,
    isolate: Any = False,
) -> Engine:
    """``target`` of ``package`` (or an artifact as it is) loaded: its files read (decrypted) once, a crash-prone
    engine's file proven in a child process first (unless ``trusted``, or ``isolate``d: an isolated engine runs in a
    child process anyway, where a crash costs a restart), then loaded in this process or in a worker."""
    if isinstance(target, Artifact):
        artifact = target
    else:
        assert package is not None
        artifact = package.artifact(target)
        if not isolate:
            get_backend(artifact.backend).probe(artifact, package.representative_shapes, trusted=trusted)
    if isolate:
        from .isolation import isolated_engine

        return isolated_engine(artifact, options, isolate)
    return load_engine(artifact, options)


def _by_name(package: Package, backend: str, precision: str | None, allow_failed: bool) -> tuple[dict[str, Any], str]:
    get_backend(backend)  # an unknown name is a BackendNotFoundError listing the known ones
    target = package.find_target(backend, precision)
    if precision is None:  # "ncnn" alone: a precision that did not fail, if the package has one
        same = [t for t in package.targets if t["backend"] == backend]
        target = next((t for t in same if target_status(t)[0] != "failed"), target)
    status, reason = target_status(target)
    if status != "failed":
        return target, f"{label(target)}: asked for by name"
    if not target.get("files"):
        raise FailedTargetError(
            f"target {label(target)} of {package.path.name} failed at compile time ({reason}) and nothing was "
            "compiled for it, so there is nothing to load; choose another target (`luodi info` lists them)"
        )
    if not allow_failed:
        raise FailedTargetError(
            f"target {label(target)} of {package.path.name} failed at compile time: {reason}. The package keeps it "
            "for debugging only: load it anyway with allow_failed=True (CLI: --allow-failed), or choose another "
            "target (`luodi info` lists them)"
        )
    log.warning("loading %s, which failed at compile time (%s), because allow_failed=True", label(target), reason)
    return target, f"{label(target)}: asked for by name; FAILED at compile time ({reason}), loaded with allow_failed"


def _unusable(target: dict[str, Any], device: str, budget: str, encrypted: bool = False) -> str:
    if target["backend"] == "reference":
        return "the reference is for verification, chosen only by name"
    ver = target.get("verification")
    status, reason = target_status(target)
    if status == "failed":
        return f"failed at compile time ({reason})"
    if ver is not None and not within_budget(target, budget):
        return f"its measured error is outside the '{budget}' accuracy budget"
    try:
        avail = get_backend(target["backend"]).available()
    except LuodiError as exc:
        return str(exc)
    if not avail.ok:
        return avail.reason
    if device.partition(":")[0] not in avail.devices:
        return f"no device '{device}' here"
    if encrypted and not get_backend(target["backend"]).in_memory:
        return "the package is encrypted and this backend loads a model only from a file"
    return ""


def _timings(
    package: Package,
    candidates: list[dict[str, Any]],
    device: str,
    load_options: LoadOptions | None = None,
    keep_open: dict[str, Engine] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Latency per target label (stored, cached or measured now) and the targets that failed to load. The targets
    measured now load with ``load_options`` (each with the engine options its backend takes); with ``keep_open``
    their engines stay open there."""
    timings = known_timings(package, device)
    cache = TimingCache()
    package_id = f"{package.manifest_sha256}:{device}"
    artifacts: dict[str, Artifact] = {}
    failed: dict[str, str] = {}
    for t in candidates:
        if label(t) not in timings:
            try:
                artifact = package.artifact(t)
                get_backend(artifact.backend).probe(artifact, package.representative_shapes)
                artifacts[label(t)] = artifact
            except LuodiError as exc:  # a damaged member or a crashing engine file: left out, the others are timed
                failed[label(t)] = str(exc)
    measured: dict[str, float] = {}
    if artifacts:
        from .verify.representative import representative_inputs

        feeds = representative_inputs(package)[0]  # the primary set: the shapes the package is run at
        per_target = {k: options_for(a.backend, load_options) for k, a in artifacts.items()} if load_options else None
        measured, failed_now = measure_many(
            artifacts, package.inputs, device, feeds=feeds, load_options=per_target, keep_open=keep_open
        )
        del artifacts  # an encrypted package's plaintext lives on only inside the engines
        failed.update(failed_now)
    if measured:
        cache.put(package_id, measured)
        timings.update(measured)
    return timings, failed
