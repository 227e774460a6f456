"""Reading and writing the .luodi zip; raises PackageError for anything that is not a sound package.

It knows the file layout and the manifest, never how an engine uses the files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends.base import Artifact
from ..errors import ZIP_ERRORS, IntegrityError, KeyRequiredError, PackageError
from ..tensor import TensorSpec
from .schema import MAX_MANIFEST_BYTES, check_manifest

FORMAT = "luodi"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
# Members at least this big are stored, not deflated: weights barely compress and load faster raw.
_STORE_ABOVE = 1 << 20


# A member this much bigger than its compressed bytes is a zip bomb: luodi stores big members uncompressed.
_BOMB_RATIO = 100
_BOMB_ABOVE = 64 << 20


def read_member(zf: zipfile.ZipFile, name: str, size: int, path: Path) -> bytes:
    """Member ``name``, refused before inflating when its declared size is not ``size`` (the pinned size, or for
    the manifest its limit) or when it would inflate like a zip bomb; zipfile stops at the declared size."""
    info = zf.getinfo(name)
    if name == MANIFEST and info.file_size > size:
        raise PackageError(f"{path}: {MANIFEST} declares {info.file_size} bytes, over the {size} limit; not a package")
    if name != MANIFEST and info.file_size != size:
        raise IntegrityError(
            f"{path}: member '{name}' holds {info.file_size} bytes but the manifest pins {size}; "
            "the package was modified or damaged: do not use it, compile it again"
        )
    bomb = bomb_error(info, path)
    if bomb is not None:
        raise bomb
    return zf.read(info)


def bomb_error(info: zipfile.ZipInfo, path: Path) -> PackageError | None:
    """The error for a member that would inflate like a zip bomb (judged from its header alone), else None."""
    if info.file_size > _BOMB_ABOVE and info.file_size > _BOMB_RATIO * max(info.compress_size, 1):
        return PackageError(
            f"{path}: member '{info.filename}' would inflate {info.compress_size} bytes to {info.file_size} "
            f"(over {_BOMB_RATIO}x): a zip bomb, not a luodi package"
        )
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def target_dir(backend: str, precision: str) -> str:
    return f"targets/{backend}-{precision}"


def write_package(
    path: str | os.PathLike[str],
    manifest: dict[str, Any],
    members: dict[str, bytes],
    *,
    sign: Callable[[bytes], dict[str, bytes]] | None = None,
) -> Path:
    """Write ``members`` and the manifest (with every member's sha256 pinned) to ``path`` atomically.

    The zip is written to a temporary file in the destination folder and renamed over ``path`` only
    when complete, so an interrupted write never leaves a file at the destination. ``sign`` gets the
    manifest's exact bytes and returns the signature member(s) to store (see luodi.package.signing).
    """
    dest = Path(path)
    if dest.is_dir():
        raise PackageError(f"{dest} is a folder; give a file name such as {dest / 'model.luodi'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest["files"] = {name: {"sha256": sha256(data), "size": len(data)} for name, data in sorted(members.items())}
    try:  # strict JSON: a NaN or Inf written as a bare token would make the package unreadable
        blob = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False).encode()
    except ValueError as exc:
        raise PackageError(f"the manifest for {dest} cannot be written as JSON ({exc}); nothing was written") from exc
    unpinned = sign(blob) if sign is not None else {}
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            zf.writestr(MANIFEST, blob, compress_type=zipfile.ZIP_DEFLATED)
            for name, data in sorted(members.items()):
                method = zipfile.ZIP_STORED if len(data) >= _STORE_ABOVE else zipfile.ZIP_DEFLATED
                zf.writestr(name, data, compress_type=method)
            for name, data in unpinned.items():
                zf.writestr(name, data, compress_type=zipfile.ZIP_STORED)
        _read_back(Path(tmp), dest, members)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _read_back(tmp: Path, dest: Path, members: dict[str, bytes]) -> None:
    """Open the written file with the reader a user will use, so an unreadable package is never put in place:
    its manifest parses and passes the schema, and every member is there at its pinned size."""
    try:
        pkg = Package(tmp)
        with pkg._zip() as zf:
            sizes = {info.filename: info.file_size for info in zf.infolist()}
    except PackageError as exc:
        raise PackageError(f"the package written for {dest} does not read back ({exc}); nothing was written") from exc
    short = [name for name, data in members.items() if sizes.get(name) != len(data)]
    if short:
        raise PackageError(f"the package written for {dest} lacks members {short[:5]} when read back; nothing written")


class Package:
    """An opened .luodi file. Members are read on demand and checked against the manifest."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise PackageError(f"a package is opened from a path (str or os.PathLike), not a {type(path).__name__}")
        self.path = Path(path)
        self.manifest = self._read_manifest()
        self._specs_in = [TensorSpec.from_dict(d) for d in self.manifest["inputs"]]
        self._specs_out = [TensorSpec.from_dict(d) for d in self.manifest["outputs"]]
        self._model_member = MODEL
        # Set by luodi.package.crypto.unlock for an encrypted package: (member name, stored bytes) -> plaintext.
        self._decrypt: Callable[[str, bytes], bytes] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Package:
        return cls(path)

    # -- reading ---------------------------------------------------------------------------
    def _zip(self) -> zipfile.ZipFile:
        if not self.path.exists():
            raise PackageError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise PackageError(f"{self.path} is a folder, not a .luodi package")
        try:
            return zipfile.ZipFile(self.path)
        except ZIP_ERRORS as exc:
            raise PackageError(
                f"{self.path} is not a luodi package (not a readable zip: {exc}); "
                "it may be truncated or corrupt: compile it again with `luodi compile`"
            ) from exc

    def _read_manifest(self) -> dict[str, Any]:
        with self._zip() as zf:
            names = set(zf.namelist())
            if MANIFEST not in names:
                raise PackageError(f"{self.path} is a zip file but not a luodi package: it has no {MANIFEST}")
            try:
                raw = read_member(zf, MANIFEST, MAX_MANIFEST_BYTES, self.path)
                manifest = json.loads(raw)
            except (*ZIP_ERRORS, RecursionError) as exc:
                raise PackageError(f"{self.path}: {MANIFEST} is unreadable ({exc}); the package is corrupt") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackageError(f"{self.path}: {MANIFEST} is not a luodi manifest")
        schema = manifest.get("schema")
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise PackageError(
                f"{self.path} uses package schema {schema}, this luodi reads up to {SCHEMA_VERSION}: upgrade luodi"
            )
        for key in ("inputs", "outputs", "targets", "files"):
            if key not in manifest:
                raise PackageError(f"{self.path}: manifest has no '{key}'; the package is corrupt")
        check_manifest(manifest, str(self.path))
        missing = sorted(set(manifest["files"]) - names)
        if missing:
            raise PackageError(f"{self.path} is missing members {missing}; the package is corrupt")
        # The manifest pins every member's sha256, so its own hash identifies the whole package.
        self.manifest_sha256 = sha256(raw)
        return manifest

    @property
    def encrypted(self) -> bool:
        return "encryption" in self.manifest

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``, checked against the sha256 pinned in the manifest (decrypted in memory)."""
        data = self.read_stored(name)
        if self._decrypt is not None:
            return self._decrypt(name, data)
        if self.encrypted:
            raise KeyRequiredError(
                f"{self.path} is encrypted: open it with a licence or passphrase, "
                "e.g. luodi.Session(path, license='customer.lic') or passphrase=..."
            )
        return data

    def read_stored(self, name: str) -> bytes:
        """Member ``name`` as stored (encrypted, in an encrypted package), checked against its pinned sha256."""
        pinned = self.manifest["files"].get(name)
        if pinned is None:
            raise PackageError(f"{self.path} has no member '{name}'")
        with self._zip() as zf:
            try:
                data = read_member(zf, name, pinned["size"], self.path)
            except (*ZIP_ERRORS, KeyError) as exc:
                raise PackageError(
                    f"{self.path}: member '{name}' is unreadable ({exc}); the package is corrupt"
                ) from exc
        if sha256(data) != pinned["sha256"]:
            raise IntegrityError(
                f"{self.path}: member '{name}' does not match its sha256 in the manifest; "
                "the package was modified or damaged: do not use it, compile it again"
            )
        return data

    # -- views -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.stem))

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._specs_in)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._specs_out)

    def target_io(self, target: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The inputs and outputs as ``target``'s engine sees them: its own ``io`` specs where it has them (int8 I/O:
        integer dtypes with scale and zero point, see luodi.quant.io), else the model's."""
        io = target.get("io")
        if io is None:
            return self.inputs, self.outputs
        ins = [TensorSpec.from_dict(d) for d in io["inputs"]]
        outs = [TensorSpec.from_dict(d) for d in io["outputs"]]
        for side, own, model in (("inputs", ins, self.inputs), ("outputs", outs, self.outputs)):
            if [s.name for s in own] != [s.name for s in model]:
                raise PackageError(
                    f"{self.path}: target {target.get('backend')}:{target.get('precision')} has io {side} "
                    f"{[s.name for s in own]}, not the model's {[s.name for s in model]}; the package is corrupt"
                )
        return ins, outs

    @property
    def targets(self) -> list[dict[str, Any]]:
        return list(self.manifest["targets"])

    @property
    def pipeline(self) -> dict[str, Any] | None:
        return self.manifest.get("pipeline")

    @property
    def model_names(self) -> list[str]:
        """The extra models of a multi-model package (e.g. ["cls", "rec"] for OCR); the primary model is "main"."""
        return sorted(self.manifest.get("models") or {})

    def submodel(self, name: str) -> Package:
        """A view of extra model ``name`` as a one-model package: its io specs, its targets, its model.onnx.

        The view reads the same zip and the same pinned checksums; only what describes the model differs.
        """
        if name == "main":
            return self
        entry = (self.manifest.get("models") or {}).get(name)
        if entry is None:
            have = ", ".join(["main", *self.model_names])
            raise PackageError(f"{self.path} has no model '{name}'; its models are: {have}")
        view = copy.copy(self)
        view.manifest = {
            **self.manifest,
            "name": f"{self.name}/{name}",
            "inputs": entry["inputs"],
            "outputs": entry["outputs"],
            "targets": entry["targets"],
            "pipeline": None,
            "models": {},
            "shapes": entry.get("shapes"),
            "example_shapes": None,
        }
        view._specs_in = [TensorSpec.from_dict(d) for d in entry["inputs"]]
        view._specs_out = [TensorSpec.from_dict(d) for d in entry["outputs"]]
        view._model_member = entry["model"]
        # Timings are cached per package hash: each model of the package needs a key of its own.
        view.manifest_sha256 = sha256(f"{self.manifest_sha256}:{name}".encode())
        return view

    @property
    def representative_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The input shapes this model is verified, warmed up, timed and benchmarked at, the primary set first.

        From the manifest's ``shapes`` (written by the compiler), else its older ``example_shapes``; a package
        with neither gets its specs with every free dim at 1 (what the compiler verified such packages at).
        """
        recorded = (self.manifest.get("shapes") or {}).get("representative")
        if recorded:
            return [{n: tuple(d) for n, d in s.items()} for s in recorded]
        example = self.manifest.get("example_shapes") or {}
        return [{s.name: tuple(example.get(s.name, s.concrete(1))) for s in self._specs_in}]

    def model_bytes(self) -> bytes:
        return self.read(self._model_member)

    def model(self) -> Any:
        """The canonical ONNX graph, with its weights: a model over 2 GB keeps them in ``<member>.data``."""
        from ..errors import ModelError
        from ..extras import require
        from ..onnx_io import from_members

        require("onnx", "reading a package's model.onnx as a graph")

        folder = posixpath.dirname(self._model_member)
        try:
            return from_members(
                self.model_bytes(), lambda loc: self.read(posixpath.join(folder, loc)), where=self._model_member
            )
        except ModelError as exc:
            raise PackageError(f"{self.path}: {exc}") from exc

    def find_target(self, backend: str, precision: str | None = None) -> dict[str, Any]:
        for t in self.manifest["targets"]:
            if t["backend"] == backend and (precision is None or t["precision"] == precision):
                return t
        have = ", ".join(f"{t['backend']}:{t['precision']}" for t in self.manifest["targets"]) or "none"
        want = f"{backend}:{precision}" if precision else backend
        raise PackageError(
            f"{self.path} has no target {want} (it has: {have}); "
            f"add it with `luodi compile MODEL -o {self.path.name} --target {want}`"
        )

    def artifact(self, target: dict[str, Any]) -> Artifact:
        """``target``'s files and options. An encrypted package's files are plaintext in memory (``in_memory``):
        whether a backend may load them is the loader's decision (Session, auto-selection, Backend.load), not
        the package's."""
        files = {rel: self.read(member) for rel, member in target["files"].items()}
        artifact = Artifact(target["backend"], target["precision"], files, dict(target.get("options", {})))
        artifact.in_memory = self.encrypted
        return artifact

    def __repr__(self) -> str:
        ts = ", ".join(f"{t['backend']}:{t['precision']}" for t in self.targets)
        return f"<Package {self.name} targets=[{ts}] at {self.path}>"


def is_package_path(model: Any) -> bool:
    """Whether ``model`` names a .luodi package (by its suffix, or a zip that is no .onnx file)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = Path(model)
    if path.suffix == ".luodi":
        return True
    return path.is_file() and path.suffix != ".onnx" and zipfile.is_zipfile(path)
