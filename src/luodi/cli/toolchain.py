"""`luodi toolchain install|list|remove`: vendor toolchains in their own Python environments (luodi.toolchain)."""

from __future__ import annotations

import click
from rich.table import Table

from .app import cli, err, out


@cli.group()
def toolchain() -> None:
    """Vendor converters (rknn-toolkit2) in environments of their own, under luodi's cache folder."""


@toolchain.command("install")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="rebuild it even when it is installed")
def install_cmd(names: tuple[str, ...], force: bool) -> None:
    """Create the environment of each toolchain NAME (a no-op when it is installed from the current spec)."""
    from .. import toolchain as tc

    for name in names:
        tc.spec(name)  # an unknown name fails before any work
    for name in names:
        st = tc.install(name, force=force, log=lambda m: err.print(m, highlight=False))
        out.print(f"{name}: installed at {st.path}", highlight=False)


@toolchain.command("list")
def list_cmd() -> None:
    """Every known toolchain: installed or not, where, its size, the backends that use it."""
    from .. import toolchain as tc

    table = Table(title=f"luodi toolchains ({tc.toolchains_dir()})")
    for col in ("toolchain", "state", "where", "size", "used by", "what"):
        table.add_column(col)
    for name, s in sorted(tc.SPECS.items()):
        st = tc.status(name)
        state = {"installed": "[green]installed[/]", "missing": "[yellow]missing[/]"}.get(
            st.state, f"[red]{st.state}[/]: {st.detail}"
        )
        size = f"{st.size() / 2**30:.2f} GiB" if st.path.exists() else ""
        where = str(st.path) if st.path.exists() else f"(luodi toolchain install {name})"
        table.add_row(name, state, where, size, ", ".join(s.used_by), s.summary)
    out.print(table)


@toolchain.command("remove")
@click.argument("names", nargs=-1, required=True)
def remove_cmd(names: tuple[str, ...]) -> None:
    """Delete the environment of each toolchain NAME."""
    from .. import toolchain as tc

    for name in names:
        out.print(f"{name}: {'removed' if tc.remove(name) else 'was not installed'}", highlight=False)
