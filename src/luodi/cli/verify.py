"""`luodi verify`: a package's targets against the float reference (or another target) on real or random data.

A few lines over luodi.verify.report plus a table, and with --layerwise one table per target from
luodi.verify.layerwise. Exit status 1 when a row FAILs; it never changes the package.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from ..errors import BackendError
from .app import allow_failed_option, cli, env_passphrase, err, out, unlock_options
from .safe import text as shown


@cli.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("-t", "--target", "targets", multiple=True, help="BACKEND[:PRECISION] to check (repeat); default all")
@click.option("--against", default="reference", show_default=True, help="what to compare with: reference or a target")
@click.option(
    "--data",
    help="a folder of images or .npy files, an .npy/.npz, or a dataset (default: 2 random inputs at each of the "
    "package's representative shapes)",
)
@click.option("--limit", type=click.IntRange(min=1), help="use this many samples of --data, spread over it")
@click.option("--layerwise", is_flag=True, help="compare every intermediate tensor and mark where the error jumps")
@allow_failed_option
@unlock_options
def verify(
    package: str,
    targets: tuple[str, ...],
    against: str,
    data: str | None,
    limit: int | None,
    layerwise: bool,
    allow_failed: bool,
    license_file: str | None,
    trust: str | None,
) -> None:
    """Compare PACKAGE's targets with the float reference (or another target) on real data.

    Exits with 1 when a row FAILs (a wrong output shape, NaN/Inf, an error outside the target's tolerance, a
    target that cannot run). An encrypted package is unlocked with --license or $LUODI_PASSPHRASE, in memory,
    as Session does."""
    from ..package.crypto import open_package
    from ..verify.report import data_feeds, verify_package
    from ..verify.representative import representative_inputs

    pkg, _ = open_package(package, trust=trust, license=license_file, passphrase=env_passphrase())
    chosen, skipped = _chosen_targets(pkg, targets, allow_failed)
    if data is None:
        feeds, where = representative_inputs(pkg, per_set=2), "random input(s) at the representative shapes"
    else:
        feeds, where = data_feeds(pkg, data, limit), "sample(s)"
    try:
        reports, ran = verify_package(pkg, feeds, chosen, against)
    except BackendError as exc:
        if data is not None:
            raise
        shapes = "; ".join(str({n: list(v) for n, v in s.items()}) for s in pkg.representative_shapes)
        raise BackendError(
            f"{exc}. The random inputs were at the package's representative shapes ({shapes}); "
            "if the model cannot run at these, verify it on real inputs with --data"
        ) from exc
    reports += skipped
    table = Table(title=f"against {against} ({shown(ran)}) on {len(feeds)} {where}")
    for col in ("target", "output", "max abs err", "cosine", "SNR dB", "top-1 agreement", "result"):
        table.add_column(col)
    for r in reports:
        agree = "" if r.agreement is None else f"{r.agreement:.2%}"
        result = "[green]pass[/]" if r.passed else f"[red]FAIL[/]: {shown(r.problem)}"
        numbers = [f"{r.max_abs:.3g}", f"{r.cosine:.6f}", f"{r.snr_db:.1f}"] if r.compared else ["-", "-", "-"]
        table.add_row(shown(r.target), shown(r.output), *numbers, agree, result)
    out.print(table)
    if layerwise:
        _print_layerwise(pkg, against, chosen, bool(targets), feeds[0])
    failed = sorted({r.target for r in reports if not r.passed})
    if failed:
        err.print(f"[red]FAIL[/]: {shown(', '.join(failed))}", highlight=False)
        sys.exit(1)


def _chosen_targets(pkg: Any, targets: tuple[str, ...], allow_failed: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    """The targets to run (all, or those named) and a FAIL row for each failed one left out; naming a target that
    failed at compile time is an error unless --allow-failed."""
    from ..errors import FailedTargetError
    from ..selection import label, parse_target, target_status
    from ..verify.report import failed_row

    chosen, skipped = [], []
    for t in pkg.targets if not targets else [pkg.find_target(*parse_target(t)) for t in targets]:
        status, reason = target_status(t)
        if status == "failed" and not t.get("files"):
            skipped.append(failed_row(label(t), "(all)", f"nothing compiled: {reason}"))
        elif status == "failed" and not allow_failed:
            if targets:
                raise FailedTargetError(
                    f"target {label(t)} failed at compile time: {reason}; check it anyway with --allow-failed"
                )
            skipped.append(failed_row(label(t), "(all)", f"failed at compile time, not run: {reason} (--allow-failed)"))
        else:
            chosen.append(t)
    return chosen, skipped


def _print_layerwise(pkg: Any, against: str, chosen: list[dict[str, Any]], named: bool, feeds: dict[str, Any]) -> None:
    from ..selection import parse_target
    from ..verify.layerwise import layerwise as compare_layers

    if against == "reference":  # the canonical graph is in every package, a reference target or not
        base = {"backend": "reference", "precision": "fp32"}
    else:
        base = pkg.find_target(*parse_target(against))
    for t in [t for t in chosen if t is not base and (named or t["backend"] != "reference")]:
        report = compare_layers(pkg, base, t, feeds)
        lt = Table(title=f"layer-wise: {shown(report.b)} against {shown(report.a)} ({report.marked})")
        for col in ("#", "tensor", "op", "cosine", "SNR dB", "max abs"):
            lt.add_column(col)
        for i, row in enumerate(report.rows):
            style = "bold red" if i == report.first_jump else None
            lt.add_row(
                str(i),
                shown(row.tensor),
                shown(row.op),
                f"{row.cosine:.6f}",
                f"{row.snr_db:.1f}",
                f"{row.max_abs:.3g}",
                style=style,
            )
        out.print(lt)
        if report.first_jump is not None:
            row = report.rows[report.first_jump]
            out.print(f"error jumps first at [bold]{shown(row.tensor)}[/] ({shown(row.op)}, node {shown(row.node)})")
