"""Licences: signed JSON naming a licensee, an expiry date, the models, and optionally one machine.

A licence carries the vendor's content key that unlocks packages encrypted for the vendor's licences;
it is checked (signature, expiry, model, machine) before that key is used. It never decrypts members.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    LicenseError,
    LicenseExpiredError,
    LicenseMachineError,
    LicenseModelError,
    LicenseSessionsError,
    LicenseSignatureError,
)
from . import signing

FORMAT = "luodi-license"
VERSION = 1
_CONTENT_INFO = b"luodi licence content key v1"


def machine_fingerprint() -> str:
    """This machine's fingerprint: sha256 of its machine id (systemd's /etc/machine-id, else the DMI product
    uuid when readable) and its host name, first 32 hex digits. Reinstalling the OS or renaming the host changes it.
    """
    ident = ""
    for source in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/sys/class/dmi/id/product_uuid"):
        try:
            ident = Path(source).read_text().strip()
        except OSError:
            continue
        if ident:
            break
    raw = f"luodi-machine-v1|{ident}|{socket.gethostname()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def content_key(vendor_key: Any) -> bytes:
    """The 32-byte key that packages encrypted for this vendor's licences are wrapped with, derived from the
    vendor's private key (HKDF-SHA256): every licence of one vendor key carries the same content key."""
    signing._ed25519()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    priv = signing.load_private_key(vendor_key)
    raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTENT_INFO).derive(raw)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise LicenseError(f"expiry '{text}' is not a date in the form YYYY-MM-DD") from None


MAX_LICENCE_BYTES = 1 << 20
"""A licence is a few hundred bytes of signed JSON; anything past this is refused unread."""


@dataclass
class License:
    """A parsed licence file. ``check`` raises a LicenseError subclass per failed check."""

    body: dict[str, Any]
    signature: bytes
    source: str = "licence"
    _sessions: list[int] = field(default_factory=lambda: [0], repr=False)

    @classmethod
    def load(cls, source: Any) -> License:
        """A licence from a path, the file's bytes/str, a dict, or a License."""
        if isinstance(source, License):
            return source
        label = "the licence given"
        if isinstance(source, dict):
            data = dict(source)
        else:
            if isinstance(source, (bytes, bytearray)):
                text = bytes(source)
            elif isinstance(source, str) and source.lstrip().startswith("{"):
                text = source.encode()
            else:
                label = str(source)
                try:
                    with open(source, "rb") as fh:  # bounded: a licence path may name /dev/zero or a huge file
                        text = fh.read(MAX_LICENCE_BYTES + 1)
                except OSError as exc:
                    raise LicenseError(f"cannot read licence {source}: {exc.strerror}") from exc
            if len(text) > MAX_LICENCE_BYTES:
                raise LicenseError(f"{label} is over {MAX_LICENCE_BYTES} bytes: not a luodi licence")
            try:
                data = json.loads(text)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise LicenseError(f"{label} is not a luodi licence (not JSON: {exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LicenseError(f'{label} is not a luodi licence (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise LicenseError(f"{label} has licence version {data.get('version')}; this luodi reads {VERSION}")
        try:
            signature = signing.unb64(data.pop("signature"))
        except (KeyError, ValueError):
            raise LicenseSignatureError(
                f"{label} has no readable signature; ask the vendor for a new licence"
            ) from None
        missing = [k for k in ("licensee", "expires", "models", "issuer_key", "content_key") if k not in data]
        if missing:
            raise LicenseError(f"{label} lacks {missing}; ask the vendor for a new licence")
        return _licence_with_counter(cls(data, signature, label))

    # -- fields -------------------------------------------------------------------------------
    @property
    def licensee(self) -> str:
        return str(self.body["licensee"])

    @property
    def expires(self) -> dt.date:
        return _parse_date(self.body["expires"])

    @property
    def models(self) -> list[str]:
        return list(self.body["models"])

    @property
    def machine(self) -> str | None:
        return self.body.get("machine")

    @property
    def max_sessions(self) -> int | None:
        return self.body.get("max_sessions")

    @property
    def issuer(self) -> str:
        """The fingerprint of the vendor key that signed the licence."""
        return signing.fingerprint(self.issuer_key)

    @property
    def issuer_key(self) -> bytes:
        try:
            return signing.unb64(self.body["issuer_key"])
        except ValueError:
            raise LicenseSignatureError(f"{self.source}: its issuer key is not readable") from None

    # -- checks -------------------------------------------------------------------------------
    def verify_signature(self, vendor_public: Any = None) -> None:
        """The licence is signed by ``vendor_public`` (default: the key it names) and unaltered."""
        key = self.issuer_key if vendor_public is None else vendor_public
        if vendor_public is not None and signing.raw_public(vendor_public) != self.issuer_key:
            raise LicenseSignatureError(
                f"{self.source} was issued with vendor key {self.issuer}, but this package accepts only licences "
                f"of vendor key {signing.fingerprint(vendor_public)}: ask the vendor for a licence for this package"
            )
        try:
            signing.load_public_key(key).verify(self.signature, _canonical(self.body))
        except signing._invalid_signature():
            raise LicenseSignatureError(
                f"{self.source}: its signature does not match its contents under vendor key {self.issuer}: "
                "the licence was altered; ask the vendor for a new licence"
            ) from None

    def check(self, model: str, vendor_public: Any = None, *, today: dt.date | None = None) -> None:
        """Signature, expiry, model name and machine binding, in that order; the first failure raises."""
        self.verify_signature(vendor_public)
        today = today or dt.datetime.now(dt.timezone.utc).date()
        if today > self.expires:
            raise LicenseExpiredError(
                f"{self.source} for {self.licensee} expired on {self.expires.isoformat()} (today is "
                f"{today.isoformat()} UTC): ask the vendor to renew it"
            )
        if model not in self.models and "*" not in self.models:
            raise LicenseModelError(
                f"{self.source} covers models {self.models}, not '{model}': ask the vendor for a licence for '{model}'"
            )
        if self.machine and self.machine != machine_fingerprint():
            raise LicenseMachineError(
                f"{self.source} is bound to machine {self.machine}, and this machine is {machine_fingerprint()}: "
                "it runs only on the machine it was issued for; send this machine's fingerprint "
                "(`luodi license fingerprint`) to the vendor for a licence"
            )

    def content_key(self) -> bytes:
        try:
            key = signing.unb64(self.body["content_key"])
        except ValueError:
            key = b""
        if len(key) != 32:
            raise LicenseError(f"{self.source}: its content key is malformed; ask the vendor for a new licence")
        return key

    def acquire_session(self) -> Any:
        """Count one open session against ``max_sessions`` (in this process); returns the release function."""
        limit = self.max_sessions
        with _COUNT_LOCK:
            counter = self._sessions
            if limit is not None and counter[0] >= limit:
                raise LicenseSessionsError(
                    f"{self.source} allows {limit} open session(s) per process and {counter[0]} are open: "
                    "close one first (Session.close() or `with luodi.Session(...)`)"
                )
            counter[0] += 1
        released = [False]

        def release() -> None:
            with _COUNT_LOCK:
                if not released[0]:
                    released[0] = True
                    counter[0] -= 1

        return release

    def describe(self) -> dict[str, Any]:
        return {
            "licensee": self.licensee,
            "id": self.body.get("id", ""),
            "issued": self.body.get("issued", ""),
            "expires": self.body["expires"],
            "models": self.models,
            "machine": self.machine or "any",
            "max_sessions": self.max_sessions if self.max_sessions is not None else "unlimited",
            "issuer": self.issuer,
        }


_COUNT_LOCK = threading.Lock()
# Open sessions per licence id in this process: loading the same licence twice shares the count.
_COUNTERS: dict[str, list[int]] = {}


def _licence_with_counter(lic: License) -> License:
    key = f"{lic.body.get('issuer_key')}:{lic.body.get('id')}"
    with _COUNT_LOCK:
        lic._sessions = _COUNTERS.setdefault(key, [0])
    return lic


def issue_license(
    vendor_key: Any,
    licensee: str,
    expires: str | dt.date,
    models: list[str],
    *,
    machine: str | None = None,
    max_sessions: int | None = None,
    output: str | os.PathLike[str] | None = None,
) -> License:
    """Issue a licence signed by ``vendor_key`` (an Ed25519 private key); write it to ``output`` when given."""
    priv = signing.load_private_key(vendor_key)
    expiry = expires if isinstance(expires, dt.date) else _parse_date(expires)
    models = [m.strip() for m in models if m.strip()]
    if not models:
        raise LicenseError("a licence must name at least one model (--models NAME[,NAME...]; '*' for every model)")
    if not licensee.strip():
        raise LicenseError("a licence must name its licensee (--licensee NAME)")
    if machine is not None and (len(machine) != 32 or any(c not in "0123456789abcdef" for c in machine)):
        raise LicenseError(
            f"'{machine}' is not a machine fingerprint (32 hex digits); run `luodi license fingerprint` on the machine"
        )
    if max_sessions is not None and max_sessions < 1:
        raise LicenseError(f"--max-sessions must be at least 1, not {max_sessions}")
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "id": secrets.token_hex(8),
        "licensee": licensee.strip(),
        "issued": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "expires": expiry.isoformat(),
        "models": models,
        "machine": machine,
        "max_sessions": max_sessions,
        "issuer_key": signing.b64(signing.raw_public(priv)),
        "content_key": signing.b64(content_key(priv)),
    }
    lic = _licence_with_counter(License(body, priv.sign(_canonical(body)), str(output or "licence")))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({**body, "signature": signing.b64(lic.signature)}, indent=2) + "\n")
    return lic
