"""Classify real photos with a compiled EfficientNet-Lite0 package and report top-1 accuracy.

Usage: python examples/imagenet_demo.py build/efficientnet-lite0.luodi
Images: scikit-image's chelsea and coffee, and the 20 labelled ImageNet images shipped in foolbox.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import luodi
from luodi.zoo.images import foolbox_imagenet, skimage_picture


def labelled_images() -> list[tuple[str, Path, int | None]]:
    """(name, image file, true ImageNet class or None) for every demo picture."""
    items: list[tuple[str, Path, int | None]] = [
        ("scikit-image chelsea (a cat)", skimage_picture("chelsea"), None),
        ("scikit-image coffee (a cup)", skimage_picture("coffee"), None),
    ]
    items += [(f"foolbox {path.name}", path, label) for path, label in foolbox_imagenet()]
    return items


def main(package: str) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    with luodi.Session(package) as session:
        console.print(f"[bold]{session.package.name}[/] on {session.backend}:{session.precision} ({session.device})")
        labels = session.pipeline.post[-1].labels
        table = Table(title="EfficientNet-Lite0 on real photos")
        for col in ("image", "truth", "top-1 prediction", "probability", ""):
            table.add_column(col)
        correct = total = 0
        for name, image, truth in labelled_images():
            best = session.predict(image, k=1)[0]
            if truth is None:
                mark, truth_text = "", "-"
            else:
                total += 1
                correct += best.index == truth
                mark = "[green]✓[/]" if best.index == truth else "[red]✗[/]"
                truth_text = labels[truth]
            table.add_row(name, truth_text, best.label, f"{best.score:.1%}", mark)
        console.print(table)
    console.print(
        f"[bold]top-1 accuracy on the {total} labelled foolbox ImageNet images: "
        f"{correct}/{total} = {correct / total:.0%}[/]"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
