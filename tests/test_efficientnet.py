"""The real pretrained EfficientNet-Lite0 through Session.predict on real labelled ImageNet pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import luodi
from luodi.zoo.images import foolbox_imagenet, skimage_picture


@pytest.fixture(scope="module")
def session(effnet_package):
    with luodi.Session(effnet_package) as s:
        yield s


def test_package_carries_model_pipeline_and_verification(effnet_package):
    pkg = luodi.Package(effnet_package)
    assert pkg.inputs[0].shape == ("batch", 3, 224, 224) and pkg.outputs[0].shape == ("batch", 1000)
    assert [s["op"] for s in pkg.pipeline["pre"]][0] == "decode_image"
    labels = pkg.pipeline["post"][-1]["labels"]
    assert len(labels) == 1000 and labels[0] == "tench" and labels[967] == "espresso"
    ver = pkg.targets[0]["verification"]
    assert ver["passed"] and ver["outputs"]["logits"]["max_abs"] < 2e-4


def test_top1_on_foolbox_imagenet(session):
    images = foolbox_imagenet()
    assert len(images) == 20
    correct = sum(session.predict(path, k=1)[0].index == label for path, label in images)
    assert correct >= 16, f"top-1 {correct}/20"


def test_real_photos(session):
    cat = [p.index for p in session.predict(skimage_picture("chelsea"), k=3)]
    assert set(cat) <= {281, 282, 285, 287}  # tabby, tiger cat, Egyptian cat, lynx
    top = session.predict(skimage_picture("coffee"))[0]
    assert top.index == 967 and top.label == "espresso" and top.score > 0.5


def test_predict_accepts_paths_arrays_pil_and_batches(session):
    path = skimage_picture("coffee")
    arr = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_array = session.predict(path), session.predict(arr)
    by_pil = session.predict(Image.open(path))
    assert by_path == by_array == by_pil
    assert len(by_path) == 5 and abs(sum(p.score for p in session.predict(path, k=1000)) - 1) < 1e-3
    batch = session.predict([path, skimage_picture("chelsea")], k=2)
    assert len(batch) == 2 and batch[0][0].index == 967 and len(batch[1]) == 2


def test_predict_errors(session, tmp_path, cnn_package):
    not_image = tmp_path / "x.jpg"
    not_image.write_text("plain text")
    with pytest.raises(luodi.PipelineError, match="cannot read an image"):
        session.predict(not_image)
    with pytest.raises(luodi.PipelineError, match="uint8"):
        session.predict(np.zeros((8, 8, 3), np.float32))
    with luodi.Session(cnn_package) as s, pytest.raises(luodi.PipelineError, match="no pre/post-processing"):
        s.predict("anything.jpg")
