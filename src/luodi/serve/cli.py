"""The `luodi serve` command: a few lines over luodi.serve.server.serve."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--repository", "-r", required=True, type=click.Path(file_okay=False), help="directory of .luodi packages"
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("-b", "--backend", default="auto", show_default=True, help="engine for every model")
@click.option("-d", "--device", default="cpu", show_default=True)
@click.option("--threads", type=int, help="engine threads per model (default: the engine's)")
@click.option("--max-batch-size", default=32, show_default=True, help="dynamic batching limit; 1 turns batching off")
@click.option("--max-queue-delay-ms", default=2.0, show_default=True, help="how long a request waits for others")
@click.option("--preferred-batch-size", "preferred", multiple=True, type=int, help="a preferred batch size (repeat)")
@click.option("--max-queue-size", default=256, show_default=True, help="queued requests per model before 503")
@click.option("--timeout-s", default=30.0, show_default=True, help="per-request timeout")
@click.option("--instances", default=1, show_default=True, help="worker threads (engine runs in parallel) per model")
@click.option("--versions", default=1, show_default=True, help="how many newest versions to keep loaded (0: all)")
@click.option("--poll-s", default=2.0, show_default=True, help="how often to look for new packages (0: never)")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
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
    max_queue_size: int,
    timeout_s: float,
    instances: int,
    versions: int,
    poll_s: float,
    log_level: str,
) -> None:
    """Serve the packages in a model repository over HTTP (KServe v2), with dynamic batching and /metrics.

    NAME.luodi is model NAME version 1; NAME/<version>/*.luodi are numbered versions (NAME/config.json may
    set that model's batching). The web page is at http://HOST:PORT/.
    """
    from .batcher import BatchConfig
    from .server import serve as run

    batching = BatchConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        preferred_batch_sizes=preferred,
        max_queue_size=max_queue_size,
        timeout_s=timeout_s,
        instances=instances,
    )
    run(
        repository,
        host=host,
        port=port,
        batching=batching,
        versions=versions,
        watch_s=poll_s or None,
        session_options={"backend": backend, "device": device, "threads": threads},
        log_level=log_level,
    )
