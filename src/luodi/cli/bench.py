"""`luodi bench`: latency, throughput, memory and per-operator profiles of a package's targets (or of an ONNX file,
compiled to a temporary package first), as a terminal table, JSON, CSV and a self-contained HTML report; with
``--url``, a load generator for any KServe v2 server. Thin over luodi.bench; see docs/bench.md.

Exit status: 0 every target measured, 3 some target could not be measured (the others were), 2 an error.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .app import _finite, cli, err, out
from .safe import text as shown

PARTIAL_EXIT = 3


def _ints(option: str, value: str) -> list[int]:
    from ..errors import InputError

    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"{option} takes integers separated by commas, e.g. 1,8; got '{value}'") from None
    if not items or any(v < 1 for v in items):
        raise InputError(f"{option} takes integers >= 1 separated by commas, e.g. 1,8; got '{value}'")
    return list(dict.fromkeys(items))


def _dims(given: dict[str, str]) -> dict[str, tuple[int, ...]]:
    from ..errors import InputError

    shapes = {}
    for name, dims in given.items():
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(
                f"--input-shape {name}={dims}: luodi bench runs at concrete sizes, e.g. {name}=1x3x224x224 "
                "(a range such as 32..640 is for compile)"
            ) from None
    return shapes


@cli.command()
@click.argument("model", required=False)
@click.option("-t", "--target", "targets", multiple=True, help="BACKEND or BACKEND:PRECISION (repeat); default: all")
@click.option("--batch", "batches", default="1", show_default=True, help="batch sizes, e.g. 1,8")
@click.option("--threads", type=click.IntRange(min=1), help="engine threads per session (default: the engine's)")
@click.option("--concurrency", default="1", show_default=True, help="in-process streams sharing one session, e.g. 1,4")
@click.option(
    "--per-stream-sessions", is_flag=True, help="each --concurrency stream its own session (default: they share one)"
)
@click.option("--duration", type=float, help="seconds per target per batch and concurrency [2]")
@click.option("--iterations", type=click.IntRange(min=1), help="calls per stream per target instead of --duration")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="an input's shape, e.g. images=1x3x224x224 (repeat per input); the batch axis follows --batch",
)
@click.option(
    "--sample",
    "sample_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="a real input: an .npz with one array per input name (the first is measured)",
)
@click.option("--profile", is_flag=True, help="per-operator times from each engine's own profiler")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="operators shown per target")
@click.option("--no-cold-start", is_flag=True, help="skip the fresh-process cold start and memory figures")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), help="write one row per target, batch, streams")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="write a self-contained HTML report")
@click.option("--url", help="a KServe v2 server to load instead of a package, e.g. http://127.0.0.1:8000")
@click.option("--model", "model_name", help="with --url: the model on the server to send requests to")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def bench(
    model: str | None,
    targets: tuple[str, ...],
    batches: str,
    threads: int | None,
    concurrency: str,
    per_stream_sessions: bool,
    duration: float | None,
    iterations: int | None,
    input_shapes: tuple[str, ...],
    sample_files: tuple[str, ...],
    profile: bool,
    top: int,
    no_cold_start: bool,
    json_file: str | None,
    csv_file: str | None,
    html_file: str | None,
    url: str | None,
    model_name: str | None,
    quiet: bool,
) -> None:
    """Measure MODEL (a .luodi package, an .onnx file or zoo:NAME) on each of its targets.

    Per target: cold start (load and first inference, in a fresh process, with its peak memory), latency
    percentiles and throughput per batch and concurrency (targets interleaved round by round), luodi's overhead over
    the engine's own call, the package's accuracy figure, and with --profile the engine's per-operator times. An
    ONNX file is compiled (and verified) to a temporary package first, for -t or onnxruntime. With --url, loads a
    KServe v2 server instead (see docs/bench.md).
    """
    from ..arguments import per_input
    from ..arrays import load_npz
    from ..bench import Plan
    from ..errors import InputError

    if not model and not url:
        raise InputError("luodi bench needs a MODEL (.luodi, .onnx or zoo:NAME), or --url with --model")
    if model and url:
        raise InputError("give a package or --url, not both")
    given = per_input("--input-shape", input_shapes, "NAME=DIMS", "images=1x3x224x224")
    plan = Plan(
        package=Path(model or "."),
        targets=list(targets),
        batches=_ints("--batch", batches),
        concurrency=_ints("--concurrency", concurrency),
        threads=threads,
        duration=duration,
        iterations=iterations,
        shapes=_dims(given) or None,
        samples=[load_npz(f, "--sample") for f in sample_files] or None,
        profile=profile,
        top=top,
        cold_start=not no_cold_start,
        per_stream_sessions=per_stream_sessions,
    )
    plan.check()
    if url:
        _bench_url(url, model_name, plan, json_file, csv_file, html_file, quiet)
        return
    with tempfile.TemporaryDirectory(prefix="luodi-bench-") as tmp:
        from ..package.archive import is_package_path

        if not is_package_path(model):
            plan.package = _compile_first(model, Path(tmp), plan, given, quiet)
            plan.source = "onnx"
            plan.targets = []
        elif not plan.package.is_file():
            raise InputError(f"no such package: {model}")
        report = _measure(plan, quiet)
    _print_report(report)
    _write_outputs(report, json_file, csv_file, html_file)
    if any(t["error"] for t in report["targets"]):
        sys.exit(PARTIAL_EXIT)


def _compile_first(model: str, tmp: Path, plan: Any, given: dict[str, str], quiet: bool) -> Path:
    """An ONNX file (or zoo:NAME) compiled and verified to a temporary package for the targets asked for."""
    from .. import compiler
    from ..progress import Progress

    path = tmp / "model.luodi"
    targets = tuple(plan.targets) or ("onnxruntime",)
    with Progress(quiet=quiet) as progress:
        compiler.compile(
            model,
            path,
            targets,
            input_shapes=given or None,
            samples=plan.samples,
            progress=progress,
        )
    plan.notes.append(f"{model} was compiled and verified to a temporary package for {', '.join(targets)}")
    return path


def _measure(plan: Any, quiet: bool) -> dict[str, Any]:
    from ..bench.measure import bench as run_bench
    from ..bench.measure import block_count, choose_targets
    from ..package import Package
    from ..progress import Progress

    count = block_count(plan, len(choose_targets(Package(plan.package), plan.targets)[0]))
    with Progress(quiet=quiet) as progress, progress.step("measuring", total=count) as step:
        return run_bench(plan, progress=step.describe, advance=step.advance)


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _print_report(report: dict[str, Any]) -> None:
    host = report["host"]
    table = Table(title=f"luodi bench: {shown(report['model']['name'])} on {host['cpu']}, {host['cores']} cores")
    for col in (
        "target",
        "start ms",
        "load ms",
        "1st run ms",
        "peak MB",
        "model MB",
        "size MB",
        "overhead µs",
        "accuracy",
    ):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in report["targets"]:
        cold = t["cold_start"] or {}
        acc = t["accuracy"]
        over = t["overhead"] or {}
        peak, base = cold.get("peak_rss_mb"), cold.get("baseline_rss_mb")
        table.add_row(
            shown(t["target"]) + (" *" if t["target"] in report["pareto"] else ""),
            *(f"{cold[k]:.0f}" if k in cold else "" for k in ("start_ms", "load_ms")),
            f"{cold['first_inference_ms']:.1f}" if "first_inference_ms" in cold else shown(cold.get("error", "")),
            _mb(peak),
            "" if peak is None or base is None else f"{peak - base:.0f}",
            f"{t['artifact_bytes'] / 1e6:.1f}",
            f"{over['overhead_us']:.1f}" if "overhead_us" in over else "",
            "" if acc is None else f"{acc['value']:.6f}" + (" top-1" if acc["metric"] == "top1_agreement" else " cos"),
        )
    out.print(table)
    out.print(
        "[dim]start: Python, luodi and the engine imported; load and 1st run in that fresh process; peak MB its peak "
        "resident memory (VmHWM), model MB the part after the imports; overhead: Session.run over the engine's own "
        "call (medians); * on the accuracy/latency Pareto front[/]"
    )
    table = Table(title="latency and throughput (targets interleaved round by round)")
    for col in ("target", "batch", "streams", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "samples/s"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in report["targets"]:
        if t["error"]:
            table.add_row(shown(t["target"]), "", "", f"[red]{shown(t['error'])}[/]", "", "", "", "", "")
        for r in t["results"]:
            table.add_row(
                shown(t["target"]),
                str(r["batch"]),
                str(r["concurrency"]),
                *(f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")),
                f"{r['throughput_per_s']:.1f}",
            )
    out.print(table)
    for t in report["targets"]:
        prof = t["profile"]
        if prof is None:
            continue
        ptable = Table(title=f"{shown(t['target'])}: per-operator time ({prof['profiler'] or 'no profiler'})")
        for col in ("node", "canonical node", "op", "kernel", "ms/run", "%"):
            ptable.add_column(col, justify="right" if col in ("ms/run", "%") else "left")
        if not prof["ops"]:
            ptable.add_row(shown(prof.get("note", "no profiler")), "", "", "", "", "")
        for o in prof["ops"]:
            ptable.add_row(
                shown(o["node"]),
                shown(o["canonical"] or "(engine's own)"),
                shown(o["op"]),
                shown(o.get("kernel", "")),
                f"{o['ms']:.4f}",
                f"{o['percent']:.1f}",
            )
        out.print(ptable)
    for note in report.get("notes", []):
        out.print(f"[dim]{shown(note)}[/]")
    for s in report.get("skipped", []):
        out.print(f"[dim]not measured: {shown(s['target'])}: {shown(s['reason'])}[/]")


CSV_FIELDS = (
    "target", "batch", "concurrency", "calls", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "throughput_per_s",
    "load_ms", "first_inference_ms", "peak_rss_mb", "artifact_bytes", "overhead_us", "accuracy",
)  # fmt: skip


def _write_outputs(report: dict[str, Any], json_file: str | None, csv_file: str | None, html_file: str | None) -> None:
    if json_file:
        Path(json_file).write_text(json.dumps(_finite(report), indent=1) + "\n")
        err.print(f"wrote {shown(json_file)}", highlight=False)
    if csv_file:
        with open(csv_file, "w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS)
            writer.writeheader()
            for t in report["targets"]:
                cold = t["cold_start"] or {}
                for r in t["results"]:
                    writer.writerow(
                        {
                            **{k: r[k] for k in CSV_FIELDS if k in r},
                            "target": t["target"],
                            "load_ms": cold.get("load_ms"),
                            "first_inference_ms": cold.get("first_inference_ms"),
                            "peak_rss_mb": cold.get("peak_rss_mb"),
                            "artifact_bytes": t["artifact_bytes"],
                            "overhead_us": (t["overhead"] or {}).get("overhead_us"),
                            "accuracy": (t["accuracy"] or {}).get("value"),
                        }
                    )
        err.print(f"wrote {shown(csv_file)}", highlight=False)
    if html_file:
        from ..bench.report import html

        Path(html_file).write_text(html(report), encoding="utf-8")
        err.print(f"wrote {shown(html_file)}", highlight=False)


def _bench_url(
    url: str,
    model_name: str | None,
    plan: Any,
    json_file: str | None,
    csv_file: str | None,
    html_file: str | None,
    quiet: bool,
) -> None:
    from ..bench.load import bench_url
    from ..errors import InputError
    from ..progress import Progress

    if html_file:
        raise InputError("--html draws a package's report; with --url give --json or --csv")
    total = len(plan.batches) * len(plan.concurrency)
    with Progress(quiet=quiet) as progress, progress.step("loading the server", total=total) as step:
        report = bench_url(
            url,
            model_name or "",
            plan.batches,
            plan.concurrency,
            plan.duration if plan.iterations is None else 600.0,
            plan.shapes,
            plan.iterations,
            say=step.describe,
            advance=step.advance,
        )
    table = Table(title=f"luodi bench --url {shown(report['url'])} --model {shown(report['model'])}")
    for col in ("batch", "clients", "requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests/s", "samples/s"):
        table.add_column(col, justify="right")
    table.add_column("errors", justify="left")
    for r in report["results"]:
        table.add_row(
            str(r["batch"]),
            str(r["concurrency"]),
            str(r["requests"]),
            *(f"{r[k]:.2f}" if k in r else "" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
            f"{r['throughput_per_s']:.1f}",
            f"{r['samples_per_s']:.1f}",
            shown(", ".join(f"{k}: {v}" for k, v in r["errors"].items())),
        )
    out.print(table)
    if json_file:
        Path(json_file).write_text(json.dumps(report, indent=1) + "\n")
        err.print(f"wrote {shown(json_file)}", highlight=False)
    if csv_file:
        fields = ["batch", "concurrency", "requests", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"]
        fields += ["throughput_per_s", "samples_per_s", "errors"]
        with open(csv_file, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fields, extrasaction="ignore")
            writer.writeheader()
            for r in report["results"]:
                writer.writerow({**r, "errors": json.dumps(r["errors"])})
        err.print(f"wrote {shown(csv_file)}", highlight=False)
    if any(r["errors"] for r in report["results"]):
        sys.exit(PARTIAL_EXIT)
