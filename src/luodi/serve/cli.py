"""The `luodi serve` command: a few lines over luodi.serve.server.serve."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--repository", "-r", required=True, type=click.Path(file_okay=False), help="directory of .luodi packages"
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("-b", "--backend", default="auto", show_default=True, help="engine for every model")
@click.option("-d", "--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="engine threads per model (default: the engine's)")
@click.option("--max-batch-size", default=32, show_default=True, help="dynamic batching limit; 1 turns batching off")
@click.option(
    "--max-queue-delay-ms",
    default=0.0,
    show_default=True,
    help="how long the oldest request waits for others (0: an idle worker takes what is queued at once)",
)
@click.option("--preferred-batch-size", "preferred", multiple=True, type=int, help="a preferred batch size (repeat)")
@click.option(
    "--max-inline-ms",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="a lone request (nothing else in the server) runs on the event loop, without the hand-off to a worker "
    "thread, when its model's lone runs take under this long (0: never)",
)
@click.option("--max-queue-size", default=256, show_default=True, help="queued requests per model before 503")
@click.option("--timeout-s", default=30.0, show_default=True, help="per-request timeout")
@click.option("--instances", default=1, show_default=True, help="worker threads (engine runs in parallel) per model")
@click.option(
    "--isolate/--no-isolate",
    default=None,
    help="run every model's engine in a worker process, so that an engine crash costs that model a restart "
    "and its in-flight requests a 503 (default: only engines that can crash on a malformed file, ncnn and MNN)",
)
@click.option("--versions", default=1, show_default=True, help="how many newest versions to keep loaded (0: all)")
@click.option("--poll-s", default=2.0, show_default=True, help="how often to look for new packages (0: never)")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.option(
    "--max-body-mb",
    default=64.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="largest request body (413 above, checked while it streams in)",
)
@click.option(
    "--max-image-pixels",
    default=40_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="largest image /predict decodes, width x height (400 above, read from the image header)",
)
@click.option(
    "--body-timeout-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="a request body must arrive within this (408 after)",
)
@click.option(
    "--header-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="a request's headers must arrive within this (the connection is closed after)",
)
@click.option(
    "--api-key",
    envvar="LUODI_API_KEY",
    help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY'); prefer $LUODI_API_KEY, "
    "which other users cannot read in the process list",
)
@click.option(
    "--public-inference", is_flag=True, help="with --api-key: inference and metadata need no key, model control does"
)
@click.option("--read-only", is_flag=True, help="no model-control routes (/v2/repository/...) at all")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False, exists=True), help="serve HTTPS with this key")
@click.option("--ssl-certfile", type=click.Path(dir_okay=False, exists=True), help="and this certificate chain")
@click.option("--ray", "on_ray", is_flag=True, help="serve as Ray Serve deployments (scale-out; needs luodi[ray])")
@click.option("--ray-address", default="local", show_default=True, help="with --ray: a cluster's HOST:PORT to join")
@click.option("--replicas", default=1, show_default=True, help="with --ray: replicas, each serving every model")
@click.option("--autoscale", metavar="MIN:MAX", help="with --ray: let Ray Serve scale replicas between MIN and MAX")
@click.option("--target-ongoing-requests", type=float, help="with --autoscale: per replica (default: the batch size)")
@click.option("--max-ongoing-requests", type=int, help="with --ray: per replica (default: twice the batch size)")
@click.option("--num-cpus", default=0.5, show_default=True, help="with --ray: CPUs each replica reserves")
@click.option(
    "--ray-resources", metavar="JSON", help="with --ray: custom resources per replica, e.g. '{\"gpu_box\": 1}'"
)
def serve(
    repository: str,
    host: str,
    port: int,
    backend: str,
    device: str,
    threads: int | None,
    max_batch_size: int,
    max_queue_delay_ms: float,
    preferred: tuple[int, ...],
    max_inline_ms: float,
    max_queue_size: int,
    timeout_s: float,
    instances: int,
    isolate: bool | None,
    versions: int,
    poll_s: float,
    log_level: str,
    max_body_mb: float,
    max_image_pixels: int,
    body_timeout_s: float,
    header_timeout_s: float,
    api_key: str | None,
    public_inference: bool,
    read_only: bool,
    ssl_keyfile: str | None,
    ssl_certfile: str | None,
    on_ray: bool,
    ray_address: str,
    replicas: int,
    autoscale: str | None,
    target_ongoing_requests: float | None,
    max_ongoing_requests: int | None,
    num_cpus: float,
    ray_resources: str | None,
) -> None:
    """Serve the packages in a model repository over HTTP (KServe v2), with dynamic batching and /metrics.

    NAME.luodi is model NAME version 1; NAME/<version>/*.luodi are numbered versions (NAME/config.json may
    set that model's batching). The web page is at http://HOST:PORT/.
    """
    from .batcher import BatchConfig
    from .server import serve as run

    # None: the engines that can crash on a malformed file (Backend.crash_prone) only; see docs/serving.md
    session_options = {"backend": backend, "device": device, "threads": threads, "isolate": isolate}
    if isolate is None:
        session_options["isolate"] = "auto"
    batching = BatchConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        preferred_batch_sizes=preferred,
        max_inline_ms=max_inline_ms,
        max_queue_size=max_queue_size,
        timeout_s=timeout_s,
        instances=instances,
    )
    limits, access = _guard(
        max_body_mb, max_image_pixels, body_timeout_s, header_timeout_s, api_key, public_inference, read_only
    )
    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise click.UsageError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    if on_ray:
        if api_key or read_only or ssl_keyfile:
            raise click.UsageError("--api-key, --read-only and --ssl-* are not supported with --ray")
        _serve_on_ray(
            repository,
            host,
            port,
            batching,
            session_options,
            ray_address,
            replicas,
            autoscale,
            target_ongoing_requests,
            max_ongoing_requests,
            num_cpus,
            ray_resources,
            limits,
        )
        return
    run(
        repository,
        host=host,
        port=port,
        batching=batching,
        versions=versions,
        watch_s=poll_s or None,
        session_options=session_options,
        log_level=log_level,
        limits=limits,
        access=access,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
    )


def _guard(
    max_body_mb: float,
    max_image_pixels: int,
    body_timeout_s: float,
    header_timeout_s: float,
    api_key: str | None,
    public_inference: bool,
    read_only: bool,
) -> tuple:
    """The request limits and access rules of the command's options."""
    from .guard import Access, Limits, MiB

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the key is empty; unset LUODI_API_KEY or give a key", param_hint="--api-key")
    if public_inference and not api_key:
        raise click.UsageError("--public-inference only means something with --api-key (or $LUODI_API_KEY)")
    limits = Limits(
        max_body_bytes=int(max_body_mb * MiB),
        max_image_pixels=max_image_pixels,
        body_timeout_s=body_timeout_s,
        header_timeout_s=header_timeout_s,
    )
    return limits, Access(api_key=api_key, public_inference=public_inference, read_only=read_only)


def _serve_on_ray(
    repository: str,
    host: str,
    port: int,
    batching: object,
    session_options: dict,
    address: str,
    replicas: int,
    autoscale: str | None,
    target: float | None,
    max_ongoing: int | None,
    num_cpus: float,
    resources: str | None,
    limits: object,
) -> None:
    import json

    from .ray import Scaling, serve_on_ray

    bounds = None
    if autoscale:
        lo, sep, hi = autoscale.partition(":")
        if not sep or not lo.isdigit() or not hi.isdigit():
            raise click.BadParameter(f"{autoscale!r} is not MIN:MAX, e.g. 1:4", param_hint="--autoscale")
        bounds = (int(lo), int(hi))
    try:
        extra = json.loads(resources) if resources else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--ray-resources") from None
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(v, (int, float)) for v in extra.values())):
        raise click.BadParameter("give a JSON object of numbers, e.g. '{\"node_a\": 1}'", param_hint="--ray-resources")
    scaling = Scaling(replicas, bounds, target, max_ongoing, num_cpus, extra)
    serve_on_ray(
        repository,
        host=host,
        port=port,
        batching=batching,
        scaling=scaling,
        session_options=session_options,
        limits=limits,
        address=address,
    )


@click.command()
@click.argument("package", type=click.Path(dir_okay=False, exists=True))
@click.argument("input_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON Lines file to write")
@click.option("--ray", "on_ray", is_flag=True, required=True, help="run on Ray Data (the only runner so far)")
@click.option("--ray-address", default="local", show_default=True, help="a cluster's HOST:PORT to join")
@click.option("--actors", default=1, show_default=True, help="Ray actors, each with its own Session")
@click.option("--batch-size", default=8, show_default=True, help="files per Ray Data batch")
@click.option("--num-cpus", default=1.0, show_default=True, help="CPUs each actor reserves")
@click.option(
    "-k", "--top", "k", type=click.IntRange(min=1), help="how many classes to keep (classification pipelines)"
)
@click.option("-b", "--backend", default="auto", show_default=True)
@click.option("-d", "--device", default="cpu", show_default=True)
def batch(
    package: str,
    input_dir: str,
    output: str,
    on_ray: bool,
    ray_address: str,
    actors: int,
    batch_size: int,
    num_cpus: float,
    k: int | None,
    backend: str,
    device: str,
) -> None:
    """Run PACKAGE's pipeline on every image in INPUT_DIR with Ray Data; one JSON line per file in OUTPUT."""
    from .ray import batch_predict

    failed = batch_predict(
        package,
        input_dir,
        output,
        actors=actors,
        batch_size=batch_size,
        num_cpus=num_cpus,
        session_options={"backend": backend, "device": device},
        predict_options={} if k is None else {"k": k},
        address=ray_address,
    )
    click.echo(f"wrote {output}" + (f" ({failed} file(s) failed: see their 'error')" if failed else ""), err=True)
    if failed:
        raise SystemExit(1)
