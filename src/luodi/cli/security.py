"""`luodi keys`, `luodi sign`, `luodi encrypt` and `luodi license`: thin commands over luodi.package's security.

Each is a few lines over signing.py, crypto.py and license.py; nothing here handles key material itself.
"""

from __future__ import annotations

import click
from rich.table import Table

from .app import cli, env_passphrase, out
from .safe import text as shown


@cli.group()
def keys() -> None:
    """Ed25519 key pairs for signing packages and issuing licences."""


@keys.command("gen")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="private key file; NAME.pub too")
@click.option("--force", is_flag=True, help="overwrite existing key files")
def keys_gen(output: str, force: bool) -> None:
    """Write a new private key OUTPUT (mode 0600) and its public key OUTPUT.pub."""
    from ..package.signing import fingerprint, generate_keys

    priv, pub = generate_keys(output, overwrite=force)
    out.print(f"wrote private key {priv} and public key {pub} (fingerprint {fingerprint(pub)})")
    out.print("keep the private key secret; give the .pub file to whoever must check your packages")


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="private key (keys gen)")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="write the signed package here (default: in place)"
)
def sign(package: str, key: str, output: str | None) -> None:
    """Sign PACKAGE with a private key: its manifest, which pins every member's sha256."""
    from ..package.signing import fingerprint, sign_package

    dest = sign_package(package, key, output)
    out.print(f"signed {dest} with key {fingerprint(key)}")


def _passphrase() -> str:
    return env_passphrase() or click.prompt("passphrase", hide_input=True, confirmation_prompt=True)


@cli.command()
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the encrypted package to write")
@click.option("--license", "license_file", type=click.Path(exists=True, dir_okay=False), help="encrypt for licences")
@click.option("--passphrase", is_flag=True, help="encrypt under a passphrase ($LUODI_PASSPHRASE, else prompted)")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False), help="sign the result with this key")
def encrypt(package: str, output: str, license_file: str | None, passphrase: bool, sign_key: str | None) -> None:
    """Encrypt every member of PACKAGE with AES-256-GCM, for a vendor's licences or a passphrase."""
    from ..errors import PackageError
    from ..package.crypto import encrypt_package

    if bool(license_file) == passphrase:
        raise PackageError("give exactly one of --license LICENSE_FILE or --passphrase")
    secret = _passphrase() if passphrase else None
    dest = encrypt_package(package, output, license=license_file, passphrase=secret, sign=sign_key)
    how = "licences of the vendor key that issued " + str(license_file) if license_file else "the passphrase"
    out.print(f"wrote {dest}: every member encrypted; it opens with {how}")


@cli.group()
def license() -> None:  # noqa: A001 - the field's word
    """Issue and inspect licences, and print this machine's fingerprint."""


@license.command("issue")
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="the vendor's private key")
@click.option("--licensee", required=True, help="who the licence is for")
@click.option("--expires", required=True, help="last valid day, YYYY-MM-DD (UTC)")
@click.option("--models", required=True, help="model names, comma-separated ('*' for all); a package's name")
@click.option("--bind-machine", "machine", help="a machine fingerprint from `luodi license fingerprint`")
@click.option(
    "--max-sessions", type=click.IntRange(min=1), help="most sessions open at once under this licence, per process"
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the licence file to write")
def license_issue(
    key: str, licensee: str, expires: str, models: str, machine: str | None, max_sessions: int | None, output: str
) -> None:
    """Issue a licence signed by the vendor key."""
    from ..package.license import issue_license

    lic = issue_license(
        key, licensee, expires, models.split(","), machine=machine, max_sessions=max_sessions, output=output
    )
    out.print(
        f"wrote licence {shown(output)} for {shown(lic.licensee)}, valid to {lic.expires.isoformat()}, "
        f"models {shown(lic.models)}"
    )


@license.command("inspect")
@click.argument("licence_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", help="also check that the licence lets this model run on this machine today")
def license_inspect(licence_file: str, model: str | None) -> None:
    """Show a licence's fields and whether its signature holds."""
    from ..package.license import License

    lic = License.load(licence_file)
    lic.verify_signature()
    table = Table(title=f"licence {shown(licence_file)}", show_header=False)
    for k, v in lic.describe().items():
        table.add_row(shown(k), shown(", ".join(map(str, v)) if isinstance(v, list) else v))
    table.add_row("signature", "[green]valid[/] (by the issuer key it names)")
    out.print(table)
    if model:
        lic.check(model)
        out.print(f"[green]ok[/]: this licence lets '{shown(model)}' run on this machine today")


@license.command("fingerprint")
def license_fingerprint() -> None:
    """Print this machine's fingerprint (for --bind-machine)."""
    from ..package.license import machine_fingerprint

    click.echo(machine_fingerprint())
