"""``luodi serve --ray``: the FastAPI app that ``luodi serve`` runs (luodi.serve.app.create_app), served by Ray
Serve replicas. Each replica holds the model repository and luodi's batcher, so routes, checks, batching and
errors are the local server's: there is one set of routes, and Ray adds only its proxy and the replicas.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import InputError, ModelNotFoundError
from ..batcher import BatchConfig
from ..guard import Access, Limits
from .cluster import connect, ray_module

APP_NAME = "luodi"
# What a replica's constructor leaves for the app builder that Ray calls right after it, in the same process.
_PENDING: dict[str, Any] = {}


@dataclass(frozen=True)
class Scaling:
    """How many replicas of each model, and what each may take on. Plain data, turned into Ray Serve options.

    ``replicas`` is a fixed count; ``autoscale`` = (min, max) lets Ray Serve add replicas while each holds more
    than ``target_ongoing_requests`` requests (default: the batch size). ``max_ongoing_requests`` must be at
    least the batch size, or no batch ever fills (Ray's default of 5 collapses throughput); the default is
    twice the batch size, so that a full batch waits while one computes.
    """

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float = 0.5
    resources: dict[str, float] | None = None

    def options(self, batching: BatchConfig) -> dict[str, Any]:
        """The keyword arguments of ``Deployment.options`` for a model batching as ``batching`` says."""
        batch = max(batching.max_batch_size, 1)
        ongoing = self.max_ongoing_requests or max(2 * batch, 8)
        bad = []
        if ongoing < batch:
            bad.append(f"max_ongoing_requests {ongoing} < max_batch_size {batch}: batches could never fill")
        if self.replicas < 1:
            bad.append(f"replicas {self.replicas} < 1")
        if self.autoscale and not 0 <= self.autoscale[0] <= self.autoscale[1] or self.autoscale == (0, 0):
            bad.append(f"autoscale {self.autoscale} must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        if self.num_cpus < 0:
            bad.append(f"num_cpus {self.num_cpus} < 0")
        if bad:
            raise InputError("invalid Ray Serve settings: " + "; ".join(bad))
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        opts: dict[str, Any] = {"max_ongoing_requests": ongoing, "ray_actor_options": actor}
        if self.autoscale:
            opts["autoscaling_config"] = {
                "min_replicas": self.autoscale[0],
                "max_replicas": self.autoscale[1],
                "target_ongoing_requests": self.target_ongoing_requests or batch,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


# -- Ray Serve --------------------------------------------------------------------------------------------
def _build_app() -> Any:
    """The replica's ASGI app: create_app over the repository its constructor opened (Ray calls this)."""
    return _PENDING.pop("app")


class _Replica:
    """One Ray Serve replica: the model repository (sessions, batchers) and luodi serve's app over it.

    Model control (/v2/repository/...) is left out (read-only): it would reach one replica of many.
    """

    def __init__(
        self, root: str, batching: BatchConfig, session_options: dict[str, Any], limits: Limits | None
    ) -> None:
        from ..app import create_app
        from ..repository import ModelRepository

        ray = ray_module()
        here = ray.get_runtime_context().get_node_id()
        node = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here), "")
        repository = ModelRepository(root, defaults=batching, session_options=session_options)
        _PENDING["app"] = create_app(
            repository,
            limits=limits,
            access=Access(read_only=True),
            headers={"luodi-node": node},
            ready=_every_replica_runs,
        )


def _every_replica_runs() -> bool:
    """Whether Ray Serve says the application runs (every replica started); once true, it stays true here."""
    if not _PENDING.get("running"):
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        _PENDING["running"] = app is not None and app.status == "RUNNING"
    return bool(_PENDING["running"])


@functools.cache
def _deployment() -> Any:
    """The deployment class, built on first use so that Ray is imported only then."""
    ray_module()
    from ray import serve

    return serve.deployment(name=APP_NAME)(serve.ingress(_build_app)(_Replica))


@dataclass
class RayServer:
    """What `deploy` deployed: the models (name -> version) and the HTTP address of Ray Serve's proxy."""

    models: dict[str, str]
    url: str
    started_ray: bool = False

    def shutdown(self) -> None:
        """Delete the deployment; a Ray this process started is stopped, a cluster it joined keeps running."""
        ray = ray_module()
        from ray import serve

        if self.started_ray:
            serve.shutdown()
        else:  # other applications may share the cluster's Serve: remove only ours
            # the controller finishes the deletion; waiting here can take a minute when a node has died
            serve.delete(APP_NAME, _blocking=False)
        ray.shutdown()


def deploy(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    batching: BatchConfig | None = None,
    scaling: Scaling | None = None,
    session_options: dict[str, Any] | None = None,
    limits: Limits | None = None,
    address: str = "local",
    node_ip: str | None = None,
    on_ray_started: Callable[[], None] | None = None,
) -> RayServer:
    """Join (or, with address "local", start) Ray and serve the newest version of every model under ``repository``.

    One Ray Serve application at / runs `luodi serve`'s app (KServe v2, predict, metadata, health, /metrics)
    on ``scaling``'s replicas, each with every model and its batcher; NAME/config.json sets a model's batching
    as for `luodi serve`. Returns once every replica is ready.
    """
    from ..repository import ModelRepository

    repo = ModelRepository(repository, defaults=batching)
    found = repo.scan()
    if not found:
        raise ModelNotFoundError(f"no .luodi package in {repo.root}; put NAME.luodi or NAME/1/*.luodi there")
    scaling = scaling or Scaling()
    widest = max((repo._config(name) for name in found), key=lambda c: c.max_batch_size)
    plan = scaling.options(replace(repo.defaults, max_batch_size=widest.max_batch_size))  # bad: fail before Ray
    ray_module()
    from ray import serve

    started = connect(address, node_ip or (host if host.startswith("127.") else "127.0.0.1")) and address == "local"
    if on_ray_started is not None:
        on_ray_started()
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    options = dict(session_options or {})
    app = _deployment().options(**plan).bind(str(repo.root.resolve()), repo.defaults, options, limits)
    serve.run(app, name=APP_NAME, route_prefix="/")
    models = {name: max(versions, key=int) for name, versions in found.items()}
    return RayServer(models, f"http://{host}:{port}", started)


def serve_on_ray(repository: str | Path, **kwargs: Any) -> None:
    """`luodi serve --ray`: deploy, then wait until SIGTERM/SIGINT and tear the deployments down (exit 0)."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def catch() -> None:  # before deploying, and again once Ray is up: ray.init installs its own SIGTERM handler
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())

    catch()
    server = None
    try:
        # A SIGTERM that arrives while deploying (the health route answers before deploy returns) is kept in
        # `stop`: the deployments are then torn down at once and the command still exits 0.
        server = deploy(repository, on_ray_started=catch, **kwargs)
        print(f"luodi on Ray Serve: {server.url} models {server.models}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
