"""luodi.export / `luodi export`: a PyTorch module to a verified package in one call, on real models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch: pip install 'luodi[torch]'")

import luodi  # noqa: E402
from conftest import installed  # noqa: E402
from luodi.zoo.images import foolbox_imagenet  # noqa: E402

pytestmark = pytest.mark.slow  # see docs/testing.md: `make check` leaves these out

ROOT = Path(__file__).resolve().parent.parent


def test_export_efficientnet_lite0_predicts_like_the_zoo_package(tmp_path, effnet_package):
    from luodi.zoo.efficientnet import _labels, _pretrained_module, imagenet_pipeline

    pkg = luodi.export(
        _pretrained_module(),
        torch.zeros(1, 3, 224, 224),
        tmp_path / "effnet.luodi",
        targets=["onnxruntime", "torch"],
        name="efficientnet-lite0",
        input_names=["images"],
        output_names=["logits"],
        pipeline=imagenet_pipeline(_labels()),
    )
    for target in pkg.manifest["targets"]:
        ver = target["verification"]
        assert ver["passed"] and ver["outputs"]["logits"]["max_abs"] <= 2e-4, (target["backend"], ver)
    assert pkg.inputs[0].shape[0] == "batch" and pkg.manifest["passes"]
    images = foolbox_imagenet()
    paths = [p for p, _ in images]
    with luodi.Session(pkg.path, backend="torch") as t, luodi.Session(effnet_package) as zoo:
        got = [top[0].index for top in t.predict(paths, k=1)]  # a batch of 20: the batch axis is dynamic
        want = [top[0].index for top in zoo.predict(paths, k=1)]
    assert got == want
    assert sum(g == label for g, (_, label) in zip(got, images)) >= 16


class _Inverse(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.inv(x)


class _WithInverse(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.solver = _Inverse()

    def forward(self, x):
        return self.solver(self.proj(x).reshape(-1, 2, 2))


def test_unsupported_operator_names_module_submodule_and_operator(tmp_path):
    out = tmp_path / "bad.luodi"
    with pytest.raises(luodi.ExportError) as info:
        luodi.export(_WithInverse(), torch.randn(2, 4), out)
    msg = str(info.value)
    assert "_WithInverse" in msg and "aten::linalg_inv" in msg and "submodule 'solver' (_Inverse)" in msg
    assert "opset 17" in msg and not out.exists()


def test_export_keeps_a_dynamic_batch_on_every_target(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 4),
    )
    net.eval()
    net[1].running_mean.uniform_(-1, 1)  # non-trivial statistics, so BatchNorm really matters
    net[1].running_var.uniform_(0.5, 2)
    targets = ["onnxruntime", "torch"] + [b for b in ("openvino", "ncnn", "mnn") if installed(b)]
    pkg = luodi.export(net, torch.zeros(1, 3, 16, 16), tmp_path / "n.luodi", targets)
    assert [i.name for i in pkg.inputs] == ["input"] and [o.name for o in pkg.outputs] == ["output"]
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    for backend in targets:
        with luodi.Session(pkg.path, backend=backend) as s:
            got = s.run({"input": x})["output"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=backend)


def test_cli_export_builds_the_module_loads_the_weights_and_verifies(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from luodi.cli.main import cli

    src = tmp_path / "my_models"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "nets.py").write_text(
        "import torch\n\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4 * 26 * 26, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_models.nets import build

    torch.manual_seed(3)
    trained = build()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    runner = CliRunner()
    args = ["export", "my_models.nets:build", "--weights", "ckpt.pt", "--input-shape", "1,1,28,28"]
    res = runner.invoke(cli, [*args, "-o", "m.luodi", "--input-name", "images", "--output-name", "logits", "--passes"])
    assert res.exit_code == 0, res.output
    assert "graph passes" in res.output and "torch:fp32" in res.output
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with luodi.Session(tmp_path / "m.luodi") as s, torch.no_grad():
        np.testing.assert_allclose(s.run({"images": x})["logits"], trained(torch.from_numpy(x)).numpy(), atol=1e-5)

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    res = runner.invoke(cli, ["export", "my_models.nets:build", "--weights", "wrong.pt", "--input-shape", "1,1,28,28",
                              "-o", "w.luodi"])  # fmt: skip
    assert res.exit_code == 2 and "do not fit Sequential" in res.output and "missing" in res.output
    res = runner.invoke(cli, ["export", "my_models.nets", "--input-shape", "1,1,28,28", "-o", "w.luodi"])
    assert res.exit_code == 2 and "is not MODULE:NAME" in res.output
    assert not (tmp_path / "w.luodi").exists()


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (make test installs it)",
)
def test_fashion_mnist_trained_here_keeps_its_accuracy_on_every_engine(tmp_path):
    """The example script, shortened: train briefly, export to every engine, classify all 10k test images."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/fashion_mnist/train_and_deploy.py"), "--epochs", "0.1"]
        + ["-o", str(tmp_path / "fm.luodi"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["torch_accuracy"] > 0.70  # a real model: 0.1 epoch already learns most of it
    engines = {r["engine"] for r in result["engines"]}
    assert {"onnxruntime", "torch"} <= engines
    assert engines >= {b for b in ("openvino", "ncnn", "mnn") if installed(b)}
    for row in result["engines"]:
        assert abs(row["diff_points"]) <= 0.1, row
    assert "test accuracy" in proc.stdout and "vs PyTorch" in proc.stdout
