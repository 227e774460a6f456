"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and a small CNN we train on it ourselves.

Reads the IDX files from disk with numpy; nothing is downloaded. Training needs torch (``luodi[torch]``).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError, ModelError

#: Where Debian's ``dataset-fashion-mnist`` puts the files; ``LUODI_FASHION_MNIST`` overrides it.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: The normalisation the CNN is trained with: (pixel / 255 - MEAN) / STD, pixel in 0..255.
MEAN, STD = 0.2860, 0.3530


def data_dir() -> Path:
    folder = Path(os.environ.get("LUODI_FASHION_MNIST", DEFAULT_DIR))
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        raise MissingExtraError(
            f"Fashion-MNIST is not in {folder}; install it with: apt-get install dataset-fashion-mnist "
            "(or point LUODI_FASHION_MNIST at a folder holding the four *-idx?-ubyte.gz files)"
        )
    return folder


def _idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic, dims, big-endian sizes, raw uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ModelError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ModelError(f"{path} is truncated: {body.size} bytes of data for shape {dims}")
    return body.reshape(dims)


def load(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the ``"train"`` (60,000) or ``"test"`` (10,000) split.

    images: uint8 ``[N, 28, 28]`` (0 = background); labels: int64 ``[N]``, indices into CLASSES.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = data_dir()
    images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> the CNN's float32 input ``[N, 1, 28, 28]`` (normalised)."""
    x = images.astype(np.float32)[:, None] / 255.0
    return (x - MEAN) / STD


def build_cnn() -> Any:
    """A small CNN (~100k parameters): two conv-BN-ReLU-pool blocks, then two linear layers."""
    try:
        from torch import nn
    except ImportError as exc:
        raise MissingExtraError("training the Fashion-MNIST CNN needs torch: pip install 'luodi[torch]'") from exc

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, len(CLASSES)),
    )


def train(
    model: Any = None,
    *,
    epochs: float = 2.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Any:
    """Train ``model`` (default: a new :func:`build_cnn`) on the 60k training images; return it in eval mode.

    ``epochs`` may be a fraction (e.g. 0.2 for a quick run); ``progress(step, steps, loss)`` is called
    every 50 steps. Deterministic for a given seed and thread count.
    """
    import torch

    torch.manual_seed(seed)
    model = model if model is not None else build_cnn()
    images, labels = load("train")
    x_all = torch.from_numpy(to_input(images))
    y_all = torch.from_numpy(labels)
    n = len(y_all)
    steps = max(1, int(epochs * n / batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    model.train()
    pos = 0
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            progress(step + 1, steps, loss.item())
    return model.eval()


def accuracy(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, batch: int = 500):
    """Fraction of ``labels`` that ``predict(x) -> logits`` gets right, in batches of ``batch``.

    Returns ``(accuracy, predicted_classes)``.
    """
    preds = []
    for i in range(0, len(labels), batch):
        preds.append(np.asarray(predict(to_input(images[i : i + batch]))).argmax(axis=1))
    predicted = np.concatenate(preds)
    return float((predicted == labels).mean()), predicted


__all__ = ["CLASSES", "INPUT_NAME", "OUTPUT_NAME", "accuracy", "build_cnn", "load", "to_input", "train"]
