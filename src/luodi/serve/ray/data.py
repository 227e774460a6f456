"""`luodi batch`: a package's pipeline over every file of a folder on Ray Data, one Session per actor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .cluster import connect, ray_module

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class _Predictor:
    """A Ray Data actor: one Session per actor, the package's pipeline on each file of a batch."""

    def __init__(self, package: str, options: dict[str, Any], predict_options: dict[str, Any]) -> None:
        from ...session import Session

        self.session = Session(package, **options)
        self.predict_options = predict_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..app import jsonable

        results, errors = [], []
        for data in batch["bytes"]:
            try:
                result = self.session.predict(bytes(data), **self.predict_options)
                results.append(json.dumps(jsonable(result)))
                errors.append("")
            except Exception as exc:  # one unreadable file must not lose the others' results
                results.append("null")
                errors.append(f"{type(exc).__name__}: {exc}")
        return {
            "path": batch["path"],
            "result": np.array(results, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def input_files(input_dir: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``input_dir`` (not recursive) whose suffix is one of ``suffixes``, sorted."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory; pass a folder of input files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"{folder} holds no file ending in {', '.join(suffixes)}")
    return files


def batch_predict(
    package: str | Path,
    input_dir: str | Path,
    output: str | Path,
    *,
    actors: int = 1,
    batch_size: int = 8,
    num_cpus: float = 1.0,
    session_options: dict[str, Any] | None = None,
    predict_options: dict[str, Any] | None = None,
    address: str = "local",
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> int:
    """Run ``package``'s pipeline on every file of ``input_dir`` with Ray Data; write one JSON line per file.

    Each line is {"file", "result", "error"} in file-name order; a file the pipeline cannot read gets its
    error and a null result. ``actors`` Ray actors each hold one Session. Returns how many files failed.
    """
    from ...package import Package

    files = input_files(input_dir, suffixes)
    if not Package(package).pipeline:
        from ...errors import PipelineError

        raise PipelineError(f"{package} has no pre/post-processing pipeline; `luodi batch` needs a package with one")
    ray = ray_module()
    started = connect(address, "127.0.0.1" if address == "local" else None)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_binary_files([str(f) for f in files], include_paths=True)
        ds = ds.map_batches(
            _Predictor,
            fn_constructor_args=(
                str(Path(package).resolve()),
                dict(session_options or {}),
                dict(predict_options or {}),
            ),
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=num_cpus,
        )
        rows = {str(Path(r["path"]).name): r for r in ds.iter_rows()}
    finally:
        if started:
            ray.shutdown()
    failed = 0
    tmp = Path(output).with_name(Path(output).name + ".part")
    with open(tmp, "w") as f:
        for path in files:
            row = rows.get(path.name)
            error = "no result came back" if row is None else row["error"]
            result = None if row is None or error else json.loads(row["result"])
            failed += bool(error)
            f.write(json.dumps({"file": path.name, "result": result, "error": error or None}) + "\n")
    tmp.replace(output)
    return failed
