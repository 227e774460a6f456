"""Train a small CNN on Fashion-MNIST, deploy it with one luodi.export call, check accuracy on every engine.

    python examples/fashion_mnist/train_and_deploy.py               # 2 epochs, ~3 minutes on 2 cores
    python examples/fashion_mnist/train_and_deploy.py --epochs 0.1  # a quick run (what `make test` does)

Trains on the 60,000 training images (Debian's dataset-fashion-mnist), exports the model to every
engine installed here, then classifies the 10,000 test images through each engine with
Session.predict (the package's own pre-processing) and compares the labelled accuracy with PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import luodi
from luodi.zoo import fashion_mnist as fm

#: Engines to deploy to, where installed (the reference evaluator is the verifier, too slow for 10k images).
ENGINES = ["onnxruntime", "openvino", "ncnn", "mnn", "torch"]


def pipeline() -> dict:
    """Grey 28x28 picture -> the normalisation the CNN was trained with -> class names."""
    return {
        "task": "classification",
        "input": fm.INPUT_NAME,
        "output": fm.OUTPUT_NAME,
        "pre": [
            {"op": "decode_image", "mode": "L"},
            {"op": "resize", "size": [28, 28], "interpolation": "bilinear"},
            {"op": "normalize", "mean": [fm.MEAN * 255], "std": [fm.STD * 255]},
            {"op": "to_tensor", "layout": "CHW", "dtype": "float32"},
        ],
        "post": [{"op": "softmax", "axis": -1}, {"op": "topk", "k": 1, "labels": fm.CLASSES}],
    }


def classify(session: luodi.Session, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Class index per image, through the package's pipeline (Session.predict on raw uint8 pictures)."""
    out = []
    for i in range(0, len(images), batch):
        out += [top[0].index for top in session.predict(list(images[i : i + batch]), k=1)]
    return np.asarray(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.0, help="training epochs (a fraction for a quick run)")
    ap.add_argument("-o", "--output", type=Path, default=Path("build/fashion-mnist-cnn.luodi"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    console = Console(width=120)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with console.status("training") as status:
        model = fm.train(epochs=args.epochs, progress=lambda s, n, loss: status.update(f"step {s}/{n} loss {loss:.3f}"))
    train_s = time.perf_counter() - t0
    images, labels = fm.load("test")
    with torch.no_grad():
        torch_acc, torch_pred = fm.accuracy(lambda x: model(torch.from_numpy(x)).numpy(), images, labels)
    console.print(f"trained {args.epochs:g} epoch(s) in {train_s:.0f} s; PyTorch test accuracy {torch_acc:.2%}")

    targets = [e for e in ENGINES if luodi.get_backend(e).available().ok]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with console.status("exporting") as status:
        pkg = luodi.export(  # the one call: PyTorch -> ONNX -> passes -> every engine -> verified package
            model,
            torch.zeros(1, 1, 28, 28),
            args.output,
            targets,
            name="fashion-mnist-cnn",
            input_names=[fm.INPUT_NAME],
            output_names=[fm.OUTPUT_NAME],
            pipeline=pipeline(),
            log=status.update,
        )
    console.print(f"wrote {pkg.path} with targets {', '.join(targets)}")

    table = Table(title=f"Fashion-MNIST test set ({len(labels)} labelled images), PyTorch {torch_acc:.2%}")
    for col in ("engine", "precision", "test accuracy", "vs PyTorch", "same prediction as PyTorch", "seconds"):
        table.add_column(col, justify="left" if col in ("engine", "precision") else "right")
    rows = []
    for target in pkg.manifest["targets"]:
        backend, precision = target["backend"], target["precision"]
        t0 = time.perf_counter()
        with luodi.Session(pkg.path, backend=backend, precision=precision) as s:
            pred = classify(s, images)
        seconds = time.perf_counter() - t0
        acc = float((pred == labels).mean())
        same = float((pred == torch_pred).mean())
        rows.append(
            {
                "engine": backend,
                "precision": precision,
                "accuracy": acc,
                "diff_points": 100 * (acc - torch_acc),
                "agreement": same,
                "seconds": seconds,
            }
        )
        table.add_row(
            backend, precision, f"{acc:.2%}", f"{100 * (acc - torch_acc):+.2f} pts", f"{same:.2%}", f"{seconds:.1f}"
        )
    console.print(table)
    result = {"epochs": args.epochs, "train_seconds": train_s, "torch_accuracy": torch_acc, "engines": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
