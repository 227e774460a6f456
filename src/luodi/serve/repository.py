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

from ..errors import InputError, LuodiError, ModelNotFoundError, ModelUnavailableError
from .batcher import BatchConfig
from .version import DRAINING, LOADING, READY, UNAVAILABLE, Files, ModelVersion

log = logging.getLogger("luodi.serve")

_MAX_INSTANCES = 256  # worker threads per model version that a config.json may ask for


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

    def loaded_versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every loaded version, or model ``name``'s (ModelNotFoundError for an unknown name), by name and number."""
        with self._lock:
            models = self.models() if name is None else [self.model(name)]
            return [mv for m in models for _, mv in sorted(m.loaded.items(), key=lambda kv: int(kv[0]))]

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
