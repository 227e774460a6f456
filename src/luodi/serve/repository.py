"""The model repository: a directory of .luodi packages with versions, loaded into sessions with batchers.

Layout (as Triton's): ``NAME.luodi`` is model NAME version 1; ``NAME/<version>/*.luodi`` holds numbered
versions; an optional ``NAME/config.json`` sets that model's batching. A new version serves new requests
once it is ready while the old one drains. No web framework here; a server calls it from threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LuodiError, ModelNotFoundError, ModelUnavailableError, UnknownTensorError
from .batcher import BatchConfig, Batcher, Feeds, Job

log = logging.getLogger("luodi.serve")

LOADING, READY, UNAVAILABLE, DRAINING = "LOADING", "READY", "UNAVAILABLE", "DRAINING"
_MAX_INSTANCES = 256  # worker threads per model version that a config.json may ask for


@dataclass
class Stats:
    """Live figures of one model version, for the web page (Prometheus has the full histograms)."""

    requests: int = 0
    failures: int = 0
    total_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    batches: int = 0
    batched_items: int = 0

    def as_dict(self) -> dict[str, Any]:
        ok = max(self.requests - self.failures, 1)
        return {
            "requests": self.requests,
            "failures": self.failures,
            "mean_latency_ms": 1000 * self.total_s / ok,
            "mean_queue_ms": 1000 * self.queue_s / ok,
            "mean_compute_ms": 1000 * self.compute_s / ok,
            "mean_batch_size": self.batched_items / self.batches if self.batches else 0.0,
        }


@dataclass
class Files:
    """What is on disk for one version: the package path and its stat, to notice a replaced file."""

    path: Path
    stamp: tuple[int, int]
    name: str = ""
    """The path relative to the repository: what clients are shown (never the server's directories)."""


class ModelVersion:
    """One version of one model, loaded: a Session, a Batcher over it, and its live figures."""

    def __init__(self, name: str, version: str, files: Files, config: BatchConfig, options: dict[str, Any]) -> None:
        from ..session import Session

        self.name, self.version, self.files, self.config = name, version, files, config
        self.stats = Stats()
        self.state = LOADING
        self._inflight = 0
        self._idle = threading.Condition()
        self._lock = threading.Lock()
        self.observer: Any = None  # metrics hooks, set by the repository
        if config.isolate is not None:  # the model's config.json overrides the server's --isolate
            options = {**options, "isolate": config.isolate}
        self.session = Session(files.path, **options)
        self.batchable = _batchable(self.session)
        self.session.prepare()  # allocate and warm up at the package's primary representative shapes
        self.batcher = Batcher(
            self.session.run_validated,  # each request was checked once, by submit()
            config,
            batchable=self.batchable,
            name=f"{name}-{version}",
            on_batch=self._on_batch,
        )

    @property
    def platform(self) -> str:
        return f"luodi_{self.session.backend}"

    def check(self, feeds: Feeds) -> None:
        """Raise an InputError naming the input when ``feeds`` does not fit the model (before it joins a batch)."""
        check_feeds(self.session, self.name, feeds)

    def submit(self, feeds: Feeds, timeout_s: float | None = None) -> Job:
        """Check ``feeds`` (the only check they get) and queue them; the job's future gives the outputs."""
        self.check(feeds)
        feeds = {n: np.ascontiguousarray(a) for n, a in feeds.items()}  # what engines read; a no-op when it is
        return self.batcher.submit(feeds, timeout_s)

    def predict(self, raw: Any, timeout_s: float | None = None, **options: Any) -> tuple[Any, Job | None]:
        """Run the package's pipeline on ``raw`` (e.g. image bytes), the model calls going through the batcher.

        Returns the result and the last model call's Job (its timings). Blocks: call it from a worker thread.
        """
        from ..errors import PipelineError

        pipe = self.session.pipeline
        if pipe is None:
            raise PipelineError(
                f"model '{self.name}' has no pre/post-processing pipeline; use /infer with tensors, "
                "or serve a package compiled with one (e.g. zoo:efficientnet-lite0)"
            )
        batched = _Batched(self, timeout_s)
        return pipe.run(raw, batched, **options), batched.job

    def observe(self, ok: bool, total_s: float, job: Job | None, reason: str = "") -> None:
        """Account one answered request (the server calls this once per request)."""
        with self._lock:
            self.stats.requests += 1
            if ok:
                self.stats.total_s += total_s
                if job is not None:
                    self.stats.queue_s += job.queue_s
                    self.stats.compute_s += job.compute_s
            else:
                self.stats.failures += 1
        if self.observer is not None:
            self.observer.request(self, ok, total_s, job, reason)

    def _on_batch(self, size: int, compute_s: float) -> None:
        with self._lock:
            self.stats.batches += 1
            self.stats.batched_items += size
        if self.observer is not None:
            self.observer.batch(self, size)

    # -- in-flight accounting, so an old version closes only once its requests are answered --------
    @contextmanager
    def use(self) -> Iterator[ModelVersion]:
        with self._idle:
            self._inflight += 1
        try:
            yield self
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def close(self, timeout_s: float = 60.0) -> None:
        """Wait for in-flight requests (bounded), drain the queue, free the engine."""
        self.state = DRAINING
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.batcher.close(drain=True, timeout_s=max(deadline - time.monotonic(), 1.0))
        self.session.close()
        self.state = UNAVAILABLE

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "package": self.files.name,  # relative to the repository: clients never see server paths
            "backend": f"{self.session.backend}:{self.session.precision}",
            "batching": self.batchable,
            "max_batch_size": self.config.max_batch_size if self.batchable else 1,
            "queue_depth": self.batcher.depth,
            "pipeline": bool(self.session.package and self.session.package.pipeline),
            "worker": self.session.worker.describe() if self.session.worker else None,  # isolated: pid, restarts
            **self.stats.as_dict(),
        }


class _Batched:
    """What a pipeline calls as its session: model runs go through the version's batcher."""

    def __init__(self, version: ModelVersion, timeout_s: float | None) -> None:
        self._v, self._timeout = version, timeout_s or version.config.timeout_s
        self.job: Job | None = None

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self._v.session.inputs}
        arrays = {n: np.asarray(a, dtype=specs[n].np_dtype) if n in specs else np.asarray(a) for n, a in feeds.items()}
        self.job = self._v.submit(arrays, self._timeout)
        return self.job.future.result(self._timeout)

    def model(self, name: str) -> Any:
        return self if name == "main" else self._v.session.model(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._v.session, name)


def check_feeds(session: Any, name: str, feeds: Feeds) -> None:
    """Raise an InputError naming the input when ``feeds`` does not fit model ``name``'s session."""
    specs = {s.name: s for s in session.inputs}
    unknown = [n for n in feeds if n not in specs]
    if unknown:
        raise UnknownTensorError(f"model '{name}' has no input(s) {unknown}; its inputs are {list(specs)}")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise InputError(f"model '{name}' needs input(s) {missing} too")
    for n, a in feeds.items():
        specs[n].check(a)


def _batchable(session: Any) -> bool:
    """Whether every input and output has a free first (batch) dim, so requests may be joined along it."""
    specs = [*session.inputs, *session.outputs]
    return all(s.shape and not isinstance(s.shape[0], int) for s in specs)


@dataclass
class Model:
    """A model name in the repository: its versions on disk, those loaded, and why not when not."""

    name: str
    on_disk: dict[str, Files] = field(default_factory=dict)
    loaded: dict[str, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE
    reason: str = ""
    config: BatchConfig | None = None
    unloaded: bool = False  # unloaded through the API: the watcher leaves it alone until it is loaded again
    failed: dict[str, tuple[int, int]] = field(default_factory=dict)  # version -> stamp of a file that failed


class ModelRepository:
    """Serves the packages under ``root``. ``defaults`` is the batching of models without a config.json.

    ``versions`` is how many of the newest versions to keep loaded (0: all). ``session_options`` go to
    every Session (backend, device, threads...). Thread-safe; the watcher is a polling thread.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        defaults: BatchConfig | None = None,
        versions: int = 1,
        session_options: dict[str, Any] | None = None,
        observer: Any = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelNotFoundError(f"the model repository {self.root} is not a directory; create it or pass another")
        self.defaults = defaults or BatchConfig()
        self.versions = versions
        self.session_options = dict(session_options or {})
        self.observer = observer
        self._models: dict[str, Model] = {}
        self._lock = threading.RLock()  # guards _models and each Model's dicts
        self._load_lock = threading.Lock()  # one load/unload at a time
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._drains: list[threading.Thread] = []
        self.closed = False
        self.started = False  # set once start() has tried every package on disk

    # -- disk -----------------------------------------------------------------------------------
    def scan(self) -> dict[str, dict[str, Files]]:
        """Every model on disk: {name: {version: Files}}."""
        found: dict[str, dict[str, Files]] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.is_file() and entry.suffix == ".luodi":
                found.setdefault(entry.stem, {})["1"] = _files(entry, self.root)
            elif entry.is_dir() and not entry.name.startswith("."):
                for vdir in entry.iterdir():
                    if vdir.is_dir() and vdir.name.isdigit():
                        pkgs = sorted(p for p in vdir.glob("*.luodi") if p.is_file())  # a FIFO would block a load
                        if pkgs:
                            found.setdefault(entry.name, {})[str(int(vdir.name))] = _files(pkgs[0], self.root)
        return found

    def _config(self, name: str) -> BatchConfig:
        path = self.root / name / "config.json"
        if not path.is_file():
            return self.defaults
        try:
            doc = json.loads(path.read_text())
            allowed = {f.name for f in fields(BatchConfig)}
            unknown = sorted(set(doc) - allowed)
            if unknown:
                raise InputError(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            if "preferred_batch_sizes" in doc:
                doc["preferred_batch_sizes"] = tuple(doc["preferred_batch_sizes"])
            instances = doc.get("instances", 1)
            if isinstance(instances, int) and instances > _MAX_INSTANCES:  # 10**8 threads hung the loader
                raise InputError(f"instances {instances} > {_MAX_INSTANCES}; one engine thread per core is plenty")
            return replace(self.defaults, **doc)
        except (ValueError, TypeError, InputError) as exc:
            raise InputError(f"{name}/config.json: {exc}") from None  # relative: clients see this reason

    # -- load / unload -------------------------------------------------------------------------
    def start(self, *, watch_s: float | None = None) -> None:
        """Load every model on disk; with ``watch_s`` poll the directory every so many seconds for changes."""
        self.sync()
        self.started = True
        if watch_s:
            self._watcher = threading.Thread(target=self._watch, args=(watch_s,), name="luodi-repo-watch", daemon=True)
            self._watcher.start()

    def sync(self) -> None:
        """Bring what is loaded in line with the disk (new, replaced and removed versions)."""
        disk = self.scan()
        with self._lock:
            names = sorted(set(disk) | set(self._models))
        for name in names:
            model = self._models.get(name)
            if model is not None and model.unloaded:
                continue
            self._reconcile(name, disk.get(name, {}))

    def load(self, name: str) -> Model:
        """(Re)load ``name`` from disk now (the repository API's load)."""
        disk = self.scan()
        if name not in disk:
            raise ModelNotFoundError(f"no model '{name}' in the repository; models there: {sorted(disk)}")
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                model.unloaded = False
        failures = self._reconcile(name, disk[name], force=True)
        model = self._models[name]
        if failures:
            serving = f"; version(s) {sorted(model.loaded, key=int)} keep serving" if model.loaded else ""
            raise ModelUnavailableError(f"model '{name}' failed to load: {'; '.join(failures.values())}{serving}")
        return model

    def unload(self, name: str) -> None:
        """Stop serving ``name``; in-flight requests finish. The watcher leaves it unloaded until load()."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise ModelNotFoundError(f"no model '{name}' is known; models: {sorted(self._models)}")
            model.unloaded = True
            old = list(model.loaded.values())
            model.loaded.clear()
            model.state, model.reason = UNAVAILABLE, "unloaded"
        for v in old:
            self._retire(v)

    def _plan(
        self, model: Model, on_disk: dict[str, Files], retry: set[str], fresh: dict[str, ModelVersion]
    ) -> tuple[list[str], list[str]]:
        """(the versions to serve, those of them to load now). A file that failed to load is skipped until it
        changes (or is retried), so the newest version that works is served: the last good one stays."""
        have = {**model.loaded, **fresh}

        def usable(v: str) -> bool:
            return v in retry or v in have or model.failed.get(v) != on_disk[v].stamp

        candidates = sorted((v for v in on_disk if usable(v)), key=int)
        wanted = candidates[-self.versions :] if self.versions else candidates
        load = [
            v
            for v in wanted
            if v not in fresh
            and (
                v in retry
                or v not in have
                or (have[v].files.stamp != on_disk[v].stamp and model.failed.get(v) != on_disk[v].stamp)
            )
        ]
        return wanted, load

    def _reconcile(self, name: str, on_disk: dict[str, Files], force: bool = False) -> dict[str, str]:
        """Load what the disk has that is not served, retire what is no longer wanted; the failures' reasons."""
        with self._load_lock:
            with self._lock:
                model = self._models.setdefault(name, Model(name))
                model.on_disk = on_disk
                retry = set(on_disk) if force else set()
                wanted, load = self._plan(model, on_disk, retry, {})
                if not load and all(v in wanted for v in model.loaded):
                    return {}
            try:
                config = self._config(name)
            except InputError as exc:
                self._failed(model, str(exc))
                return {"config": str(exc)}
            fresh: dict[str, ModelVersion] = {}
            failures: dict[str, str] = {}
            with self._lock:
                if not model.loaded:
                    model.state = LOADING
            while load:
                for v in load:
                    mv = self._load_version(model, v, on_disk[v], config, failures)
                    if mv is not None:
                        fresh[v] = mv
                with self._lock:  # a failed version is no longer wanted: plan again without it
                    wanted, load = self._plan(model, on_disk, set(), fresh)
            with self._lock:  # the switch: new requests see the new versions from here on
                retired = [model.loaded.pop(v) for v in list(model.loaded) if v in fresh or v not in wanted]
                unneeded = [mv for v, mv in fresh.items() if v not in wanted]
                model.loaded.update({v: mv for v, mv in fresh.items() if v in wanted})
                model.config = config
                model.state = READY if model.loaded else UNAVAILABLE
                broken = sorted((v for v in on_disk if model.failed.get(v) == on_disk[v].stamp), key=int)
                idle = f"version(s) {broken} failed to load; replace the file(s)" if broken else "no version on disk"
                model.reason = "; ".join(failures.values()) if failures else ("" if model.loaded else idle)
            if self.observer is not None:
                for v, mv in fresh.items():
                    if v in wanted:
                        self.observer.added(mv)
            for mv in unneeded:
                mv.close()
            for mv in retired:
                self._retire(mv)
            return failures

    def _load_version(
        self, model: Model, v: str, files: Files, config: BatchConfig, failures: dict[str, str]
    ) -> ModelVersion | None:
        """Load one version, or record why not: any exception is that version's failure, never the server's."""
        t0 = time.perf_counter()
        try:
            mv = ModelVersion(model.name, v, files, config, self.session_options)
        except Exception as exc:  # a package must not be able to wedge the model in LOADING by raising oddly
            model.failed[v] = files.stamp
            text = str(exc) if isinstance(exc, LuodiError) else f"{type(exc).__name__}: {exc}"
            failures[v] = f"version {v} ({files.name}): {self._redact(text)}"
            self._failed(model, failures[v], exc if not isinstance(exc, LuodiError) else None)
            return None
        model.failed.pop(v, None)
        mv.observer = self.observer
        mv.state = READY
        log.info(
            "loaded",
            extra={"event": "load", "model": model.name, "version": v, "load_s": round(time.perf_counter() - t0, 3)},
        )
        return mv

    def _redact(self, text: str) -> str:
        """A load failure's message without the server's directories: clients see the repository's names only."""
        for root in {str(self.root.resolve()), str(self.root)}:
            text = text.replace(root + "/", "").replace(root, "<repository>")
        return text

    def _failed(self, model: Model, reason: str, exc: BaseException | None = None) -> None:
        log.error("load failed", exc_info=exc, extra={"event": "load_failed", "model": model.name, "reason": reason})
        with self._lock:
            model.reason = reason
            if not model.loaded:
                model.state = UNAVAILABLE

    def _retire(self, mv: ModelVersion) -> None:
        """Close an old version once its in-flight requests are answered, off the caller's thread."""
        mv.state = DRAINING

        def drain() -> None:
            mv.close()
            if self.observer is not None:
                self.observer.removed(mv)
            log.info("unloaded", extra={"event": "unload", "model": mv.name, "version": mv.version})

        t = threading.Thread(target=drain, name=f"luodi-drain-{mv.name}-{mv.version}", daemon=True)
        self._drains.append(t)
        t.start()

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.sync()
            except Exception:  # a watcher that dies silently would stop hot reload for good
                log.exception("repository scan failed")

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version that serves a request: ``version`` or the newest ready one."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise ModelNotFoundError(f"no model '{name}' in this server; models: {sorted(self._models)}")
            if version is None:
                if not model.loaded:
                    raise ModelUnavailableError(f"model '{name}' is not ready ({model.state}): {model.reason}")
                return model.loaded[max(model.loaded, key=int)]
            mv = model.loaded.get(str(version))
            if mv is None:
                if str(version) in model.on_disk:
                    raise ModelUnavailableError(
                        f"version {version} of model '{name}' is not loaded; loaded: {sorted(model.loaded, key=int)}"
                    )
                raise ModelNotFoundError(f"model '{name}' has no version {version}; on disk: {sorted(model.on_disk)}")
            return mv

    @contextmanager
    def acquire(self, name: str, version: str | None = None) -> Iterator[ModelVersion]:
        """The serving version, held so that it does not close until the block ends."""
        with self._lock:
            mv = self.get(name, version)
            cm = mv.use()
            cm.__enter__()
        try:
            yield mv
        finally:
            cm.__exit__(None, None, None)

    def model(self, name: str) -> Model:
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"no model '{name}' in this server; models: {sorted(self._models)}")
        return model

    def models(self) -> list[Model]:
        with self._lock:
            return [self._models[n] for n in sorted(self._models)]

    def index(self) -> list[dict[str, Any]]:
        """The repository API's index: one row per model version on disk or loaded."""
        rows = []
        with self._lock:
            models = [(m, dict(m.on_disk), dict(m.loaded)) for m in self.models()]
        for m, on_disk, loaded in models:
            for v in sorted(set(on_disk) | set(loaded), key=int):
                mv = loaded.get(v)
                state = mv.state if mv else (m.state if m.state == LOADING else UNAVAILABLE)
                reason = "" if mv else (m.reason or "not loaded (older version)")
                rows.append({"name": m.name, "version": v, "state": state, "reason": reason})
            if not on_disk and not loaded:
                rows.append({"name": m.name, "version": "", "state": UNAVAILABLE, "reason": m.reason})
        return rows

    def status(self) -> list[dict[str, Any]]:
        """Every model with its loaded versions' state and live figures (the web page's data)."""
        with self._lock:
            models = [
                (m, sorted(m.on_disk, key=int), sorted(m.loaded.items(), key=lambda kv: int(kv[0])))
                for m in self.models()
            ]
        return [
            {
                "name": m.name,
                "state": m.state,
                "reason": m.reason,
                "versions_on_disk": on_disk,
                "versions": [mv.describe() for _, mv in loaded],
            }
            for m, on_disk, loaded in models
        ]

    def ready(self) -> bool:
        """The server's readiness: the start-up scan has tried every package, and at least one model serves
        (or none is meant to: an empty repository, or every model unloaded). One model failing to load does
        not make the server unready; its own /v2/models/NAME/ready says so (docs/serving.md)."""
        with self._lock:
            if self.closed or not self.started:
                return False
            expected = [m for m in self._models.values() if m.on_disk and not m.unloaded]
            return not expected or any(m.state == READY for m in expected)

    def readiness(self) -> dict[str, int]:
        """How many models serve and how many do not (counts only: the health route needs no key)."""
        with self._lock:
            expected = [m for m in self._models.values() if m.on_disk and not m.unloaded]
            ready = sum(m.state == READY for m in expected)
        return {"models_ready": ready, "models_unavailable": len(expected) - ready}

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop watching, drain every loaded version, and free the engines."""
        self.closed = True
        self._stop.set()
        with self._lock:
            versions = [mv for m in self._models.values() for mv in m.loaded.values()]
            for m in self._models.values():
                m.loaded.clear()
        for mv in versions:
            self._retire(mv)
        for t in self._drains:
            t.join(timeout_s)


def _files(path: Path, root: Path) -> Files:
    st = path.stat()
    return Files(path, (st.st_mtime_ns, st.st_size), path.relative_to(root).as_posix())
