"""Encrypted packages (AES-256-GCM per member) and opening a package under trust, licence or passphrase.

Decryption happens in memory only: plaintext members go from here to a backend's load-from-memory path,
never to a file. The manifest stays readable (io specs, targets) and is authenticated by every member.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, KeyRequiredError, LicenseError, PackageError
from . import signing
from .archive import Package, write_package

CIPHER = "AES-256-GCM"
CHECK = "encryption.check"
"""A member whose plaintext is known: decrypting it proves the key is right and the manifest unaltered."""
_CHECK_PLAINTEXT = b"luodi encrypted package v1"
_NONCE = 12
# scrypt cost: about 0.1 s and 32 MiB per unlock on a laptop core; brute-forcing a passphrase pays the same.
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
# The manifest carries the cost, so a hostile package could ask for gigabytes and minutes (n=2**22 took 4.1 GB and
# 52 s) before "the passphrase is wrong". These bounds are 8x the default's memory and 16x its work.
SCRYPT_MAX_N = 2**20
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
SCRYPT_MAX_MEMORY = 256 << 20  # bytes: scrypt holds 128 * r * n
SCRYPT_MAX_WORK = 2**22  # n * r * p, the number of block mixes; the default is 2**18


def _aesgcm() -> Any:
    signing._ed25519()  # the MissingExtraError when cryptography is absent
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def manifest_digest(manifest: dict[str, Any]) -> bytes:
    """What every member's authentication binds to: the manifest without its member list and signer.

    ("files" pins the ciphertexts, so it cannot be inside them; the signature covers it instead.)
    """
    core = {k: v for k, v in manifest.items() if k not in ("files", "signer")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).digest()


def _aad(name: str, digest: bytes) -> bytes:
    return b"luodi-member-v1\0" + name.encode() + b"\0" + digest


def _scrypt(passphrase: str | bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    _aesgcm()
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def scrypt_params(info: dict[str, Any], where: str) -> tuple[int, int, int]:
    """The manifest's scrypt ``n``, ``r``, ``p``, refused (PackageError naming the field) when they would cost more
    memory or time than any package luodi writes; checked before anything is derived."""
    values = {}
    for field, top in (("n", SCRYPT_MAX_N), ("r", SCRYPT_MAX_R), ("p", SCRYPT_MAX_P)):
        v = info.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
            raise PackageError(
                f"{where}: encryption.unlock.{field} = {v!r} is outside 1..{top}; the package asks for a scrypt "
                "cost no luodi package has: it is damaged or hostile"
            )
        values[field] = v
    n, r, p = values["n"], values["r"], values["p"]
    if n < 2 or n & (n - 1):
        raise PackageError(f"{where}: encryption.unlock.n = {n} is not a power of two; the package is corrupt")
    if 128 * r * n > SCRYPT_MAX_MEMORY:
        raise PackageError(
            f"{where}: encryption.unlock.n and .r ask scrypt for {128 * r * n >> 20} MiB, over the "
            f"{SCRYPT_MAX_MEMORY >> 20} MiB limit: the package is damaged or hostile"
        )
    if n * r * p > SCRYPT_MAX_WORK:
        raise PackageError(
            f"{where}: encryption.unlock.n, .r and .p ask scrypt for {n * r * p} block mixes, over the "
            f"{SCRYPT_MAX_WORK} limit: the package is damaged or hostile"
        )
    return n, r, p


def encrypt_package(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    license: Any = None,  # noqa: A002 - the field's word
    passphrase: str | bytes | None = None,
    sign: Any = None,
) -> Path:
    """Write ``source`` encrypted to ``output``: a fresh content key, every member under AES-256-GCM.

    The content key is wrapped either under the vendor content key that ``license`` carries (any licence
    of the same vendor key then opens the package, subject to its checks) or under a scrypt key from
    ``passphrase``. ``sign``: a private key to sign the result with (a source signature does not carry over).
    """
    if (license is None) == (passphrase is None):
        raise PackageError("encrypt for exactly one of a licence (--license FILE) or a passphrase (--passphrase)")
    aesgcm = _aesgcm()
    pkg = Package(source)
    if pkg.encrypted:
        raise PackageError(f"{source} is already encrypted")
    members = {name: pkg.read(name) for name in pkg.manifest["files"]}
    cek = aesgcm.generate_key(bit_length=256)
    if license is not None:
        from .license import License

        lic = License.load(license)
        lic.verify_signature()
        kek = lic.content_key()
        unlock = {"kind": "license", "issuer": lic.issuer, "issuer_key": signing.b64(lic.issuer_key)}
    else:
        if not passphrase:
            raise PackageError("the passphrase is empty; give a passphrase")
        salt = os.urandom(16)
        kek = _scrypt(passphrase, salt, **_SCRYPT)
        unlock = {"kind": "passphrase", "kdf": "scrypt", "salt": signing.b64(salt), **_SCRYPT}
    nonce = os.urandom(_NONCE)
    unlock["wrapped_key"] = signing.b64(nonce + aesgcm(kek).encrypt(nonce, cek, b"luodi-key-wrap-v1"))
    manifest = {k: v for k, v in pkg.manifest.items() if k not in ("files", "signer")}
    manifest["encryption"] = {"cipher": CIPHER, "version": 1, "unlock": unlock}
    digest = manifest_digest(manifest)
    box = aesgcm(cek)
    sealed = {}
    for name, data in members.items():
        nonce = os.urandom(_NONCE)
        sealed[name] = nonce + box.encrypt(nonce, data, _aad(name, digest))
    nonce = os.urandom(_NONCE)
    sealed[CHECK] = nonce + box.encrypt(nonce, _CHECK_PLAINTEXT, _aad(CHECK, digest))
    signer = None
    if sign is not None:
        manifest["signer"], signer = signing.signer(sign)
    return write_package(output, manifest, sealed, sign=signer)


def unlock(pkg: Package, *, license: Any = None, passphrase: str | bytes | None = None) -> Any:  # noqa: A002
    """Make ``pkg`` decrypt its members in memory. Licence checks come first; returns the License or None."""
    enc = pkg.manifest.get("encryption")
    if not isinstance(enc, dict) or not isinstance(enc.get("unlock"), dict):
        raise PackageError(f"{pkg.path}: its encryption entry is malformed; the package is corrupt")
    info = enc["unlock"]
    kind = info.get("kind")
    if enc.get("cipher") != CIPHER:
        raise PackageError(f"{pkg.path} is encrypted with {enc.get('cipher')}; this luodi knows {CIPHER}")
    aesgcm, invalid = _aesgcm(), _invalid_tag()
    lic = None
    try:
        if kind == "license":
            if license is None:
                raise KeyRequiredError(
                    f"{pkg.path} is encrypted for licences of vendor key {info.get('issuer')}: "
                    "open it with license=FILE (CLI: --license FILE)"
                )
            from .license import License

            lic = License.load(license)
            lic.check(pkg.name, signing.unb64(info["issuer_key"]))
            kek = lic.content_key()
        elif kind == "passphrase":
            if passphrase is None:
                raise KeyRequiredError(f"{pkg.path} is encrypted with a passphrase: open it with passphrase=...")
            n, r, p = scrypt_params(info, str(pkg.path))
            kek = _scrypt(passphrase, signing.unb64(info["salt"]), n, r, p)
        else:
            raise PackageError(f"{pkg.path} is encrypted in an unknown way ('{kind}'); upgrade luodi")
        wrapped = signing.unb64(info["wrapped_key"])
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, LicenseError):
            raise
        raise PackageError(f"{pkg.path}: its encryption entry is malformed ({exc}); the package is corrupt") from exc
    try:
        cek = aesgcm(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], b"luodi-key-wrap-v1")
    except invalid:
        what = "the passphrase is wrong" if kind == "passphrase" else "the licence's content key does not open it"
        raise KeyRequiredError(f"{pkg.path} cannot be unlocked: {what}") from None
    box = aesgcm(cek)
    digest = manifest_digest(pkg.manifest)

    def decrypt(name: str, stored: bytes) -> bytes:
        try:
            return box.decrypt(stored[:_NONCE], stored[_NONCE:], _aad(name, digest))
        except invalid:
            raise IntegrityError(
                f"{pkg.path}: member '{name}' fails authentication: the member or the manifest was altered, "
                "or the member was moved from another package; do not use it"
            ) from None

    decrypt(CHECK, pkg.read_stored(CHECK))
    pkg._decrypt = decrypt
    return lic


def open_package(
    model: str | os.PathLike[str] | Package,
    *,
    trust: Any = None,
    license: Any = None,  # noqa: A002
    passphrase: str | bytes | None = None,
) -> tuple[Package, Any]:
    """Open a package: verify it against ``trust`` (before parsing it), then unlock it when encrypted.

    Returns the package and the License that unlocked it (or None). An unsigned package loads unless
    ``trust`` is given; a licence given for a plain package is checked against the key it names.
    """
    path = model.path if isinstance(model, Package) else Path(model)
    verified = signing.verify_package(path, trust) if trust is not None else None
    pkg = model if isinstance(model, Package) else Package(path)
    if verified is not None and hashlib.sha256(verified).hexdigest() != pkg.manifest_sha256:
        raise IntegrityError(f"{path} changed while it was being opened; open it again")
    if pkg.encrypted:
        if pkg._decrypt is not None and license is None and passphrase is None:
            return pkg, None  # unlocked already (a Package handed on, e.g. a further model's view)
        return pkg, unlock(pkg, license=license, passphrase=passphrase)
    lic = None
    if license is not None:
        from .license import License

        lic = License.load(license)
        lic.check(pkg.name)
    return pkg, lic
