"""Ed25519 keys and package signatures: the signature covers the manifest, which pins every member's sha256.

It signs and verifies bytes with the `cryptography` package (imported lazily); it never decrypts anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ZIP_ERRORS, IntegrityError, MissingExtraError, PackageError

SIGNATURE = "signature.ed25519"
"""The package member holding the 64-byte Ed25519 signature of manifest.json's exact bytes."""
ALGORITHM = "ed25519"


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise MissingExtraError(
            "signing, encryption and licences need the 'cryptography' package: pip install 'luodi[security]'"
        ) from exc
    return ed25519


def _serialization() -> Any:
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


def generate_keys(name: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``name`` (PEM, PKCS#8, mode 0600) and its public key to ``name.pub``."""
    ser = _serialization()
    priv_path = Path(name)
    pub_path = Path(f"{priv_path}.pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise PackageError(f"{p} exists; choose another name or remove it (a key is never overwritten silently)")
    key = _ed25519().Ed25519PrivateKey.generate()
    priv = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def _key_bytes(key: Any, what: str) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    if not isinstance(key, (str, os.PathLike)):
        raise PackageError(
            f"the {what} must be a path, PEM or raw bytes, or a cryptography Ed25519 key; got a {type(key).__name__}"
        )
    path = Path(key)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read the {what} {path}: {exc.strerror}; create keys with `luodi keys gen`") from exc


def load_private_key(key: Any) -> Any:
    """An Ed25519 private key from a path, PEM bytes, raw 32 bytes, or the key object itself."""
    ed = _ed25519()
    if isinstance(key, ed.Ed25519PrivateKey):
        return key
    data = _key_bytes(key, "private key")
    try:
        if len(data) == 32:
            return ed.Ed25519PrivateKey.from_private_bytes(data)
        loaded = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{_label(key)} is not an unencrypted Ed25519 private key in PEM ({exc})") from exc
    if not isinstance(loaded, ed.Ed25519PrivateKey):
        raise PackageError(f"{_label(key)} is not an Ed25519 key; create one with `luodi keys gen -o NAME`")
    return loaded


def load_public_key(key: Any) -> Any:
    """An Ed25519 public key from a path (.pub), PEM bytes, raw 32 bytes, or a private or public key object."""
    ed = _ed25519()
    if isinstance(key, ed.Ed25519PublicKey):
        return key
    if isinstance(key, ed.Ed25519PrivateKey):
        return key.public_key()
    data = _key_bytes(key, "public key")
    try:
        if len(data) == 32:
            return ed.Ed25519PublicKey.from_public_bytes(data)
        if b"PRIVATE KEY" in data:
            return load_private_key(data).public_key()
        loaded = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{_label(key)} is not an Ed25519 public key in PEM ({exc})") from exc
    if not isinstance(loaded, ed.Ed25519PublicKey):
        raise PackageError(f"{_label(key)} is not an Ed25519 key; create one with `luodi keys gen -o NAME`")
    return loaded


def _label(key: Any) -> str:
    return "the key given" if isinstance(key, (bytes, bytearray)) else str(key)


def raw_public(key: Any) -> bytes:
    ser = _serialization()
    return load_public_key(key).public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def fingerprint(key: Any) -> str:
    """A public key's short name: the first 16 bytes of the sha256 of its raw 32 bytes, in hex."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:32]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def signer(key: Any) -> tuple[dict[str, str], Any]:
    """The manifest's ``signer`` entry for private key ``key``, and the function write_package signs with."""
    priv = load_private_key(key)
    entry = {"algorithm": ALGORITHM, "key": fingerprint(priv)}

    def sign(manifest_bytes: bytes) -> dict[str, bytes]:
        return {SIGNATURE: priv.sign(manifest_bytes)}

    return entry, sign


def sign_package(path: str | os.PathLike[str], key: Any, output: str | os.PathLike[str] | None = None) -> Path:
    """Sign package ``path`` with private ``key``, in place or into ``output``; an old signature is replaced."""
    from .archive import MANIFEST, Package, write_package

    pkg = Package(path)
    members = {name: pkg.read_stored(name) for name in pkg.manifest["files"]}
    manifest = {k: v for k, v in pkg.manifest.items() if k not in ("files", "signer")}
    entry, sign = signer(key)
    manifest["signer"] = entry
    assert MANIFEST not in members
    return write_package(output or path, manifest, members, sign=sign)


def verify_package(path: str | os.PathLike[str], trust: Any) -> bytes:
    """Check package ``path`` against public key ``trust``: the manifest's signature, then every member's sha256.

    Raises IntegrityError naming what does not match (an unsigned package included). Reads the zip
    directly, before parsing anything, so a forged manifest is never interpreted. Returns the manifest's bytes.
    """
    import json

    from .archive import MANIFEST, sha256
    from .schema import MAX_MANIFEST_BYTES

    public = load_public_key(trust)
    ed_invalid = _invalid_signature()
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise IntegrityError(f"{path} is not a readable package ({exc}); it may be damaged or altered") from exc
    with zf:
        names = set(zf.namelist())
        if SIGNATURE not in names:
            raise IntegrityError(
                f"{path} is not signed, and a trusted key was given: only a package signed by "
                f"{fingerprint(public)} is accepted; sign it with `luodi sign {path.name} --key VENDOR_KEY`"
            )
        # Sizes come first, before any inflating or signature work: a bomb costs its declared size, never more.
        raw = _member(zf, path, MANIFEST, MAX_MANIFEST_BYTES)
        signature = _member(zf, path, SIGNATURE, _SIGNATURE_BYTES)
        try:
            public.verify(signature, raw)
        except ed_invalid:
            raise IntegrityError(
                f"{path}: the signature in '{SIGNATURE}' does not match manifest.json under the trusted key "
                f"{fingerprint(public)}: the package was altered or signed by another key; do not use it"
            ) from None
        try:
            manifest = json.loads(raw)
        except ValueError as exc:  # signed, yet not JSON: the signer's own doing
            raise PackageError(f"{path}: its signed manifest is not JSON ({exc})") from exc
        for name, pinned in (manifest.get("files") or {}).items():
            if name not in names:
                raise IntegrityError(f"{path}: member '{name}' is missing; the package was altered")
            size = pinned.get("size") if isinstance(pinned, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise IntegrityError(f"{path}: the signed manifest pins no size for member '{name}'; do not use it")
            if sha256(_member(zf, path, name, size, exact=True)) != pinned.get("sha256"):
                raise IntegrityError(
                    f"{path}: member '{name}' does not match its sha256 in the signed manifest; "
                    "the package was altered or damaged: do not use it"
                )
    return raw


_SIGNATURE_BYTES = 64


def _member(zf: zipfile.ZipFile, path: Path, name: str, size: int, exact: bool = False) -> bytes:
    """Member ``name``, refused before inflating when it declares more than ``size`` bytes (or other than ``size``
    when ``exact``) or inflates like a zip bomb; zipfile never reads past the declared size."""
    from .archive import bomb_error

    try:
        info = zf.getinfo(name)
        declared = info.file_size
        if declared > size or (exact and declared != size):
            raise IntegrityError(
                f"{path}: member '{name}' declares {declared} bytes where "
                + (f"the signed manifest pins {size}" if exact else f"at most {size} are allowed")
                + "; the package was altered: do not use it"
            )
        bomb = bomb_error(info, path)
        if bomb is not None:
            raise bomb
        return zf.read(info)
    except (*ZIP_ERRORS, KeyError) as exc:
        raise IntegrityError(
            f"{path}: member '{name}' is unreadable ({exc}); the package was altered or damaged"
        ) from exc


def _invalid_signature() -> type[Exception]:
    _ed25519()
    from cryptography.exceptions import InvalidSignature

    return InvalidSignature
