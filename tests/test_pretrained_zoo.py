"""``secateurs prune`` on a zoo model or a torchvision model with its checkpoint, and a
torchvision ImageFolder as calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from secateurs import prune
from secateurs.cli import app
from secateurs.experiment.models import build_model


def _prune(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["prune", *args])
    return result.exit_code, result.stderr


def test_a_zoo_name_with_its_checkpoint_is_pruned_as_the_library_prunes_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mlp.safetensors"))
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "out"
    code, stderr = _prune(str(tmp_path / "mlp.safetensors"), "--factory", "mlp:1x8x8:10", "--calibration",
                          str(tmp_path / "x.npz"), "--method", "sparsegpt", "--sparsity", "0.5",
                          "--batch-size", "8", "--out", str(out), "--quiet")
    assert code == 0, stderr
    pruned = load_file(str(out / "mlp.safetensors"))
    batches = [torch.from_numpy(x[i : i + 8]) for i in range(0, 32, 8)]
    prune.oneshot(model, batches, method="sparsegpt", sparsity=0.5)
    assert set(pruned) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pruned[key], value, rtol=0, atol=0)
    assert float((pruned["net.1.weight"] == 0).float().mean()) == 0.5


@pytest.mark.parametrize(("factory", "message"), [
    ("resnet20", "resnet20:CxHxW:CLASSES"),
    ("resnet20:3x32:x", "resnet20:CxHxW:CLASSES"),
    ("torchvision.nosuchnet", "torchvision.NAME"),
    ("nosuchzoo", "zoo names: mlp"),
])
def test_a_bad_factory_is_one_line_naming_the_forms(tmp_path: Path, factory: str, message: str) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    code, stderr = _prune(str(tmp_path / "m.safetensors"), "--factory", factory, "--method", "magnitude",
                          "--sparsity", "0.5", "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--factory" in stderr and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = (rng.random((40 + 8 * i, 48, 3)) * 255 * (c + 1) / 3).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_torchvision_model_is_pruned_on_an_image_folder(tmp_path: Path) -> None:
    models = pytest.importorskip("torchvision.models")
    from torchvision import datasets, transforms

    from secateurs.pretrained.data import read_batches

    folder = _image_folder(tmp_path / "images")
    batches = read_batches(folder, field="--calibration", samples=6, batch_size=3)
    reference = datasets.ImageFolder(str(folder), transform=transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(images, torch.stack([reference[i][0] for i in range(6)]))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]

    torch.manual_seed(0)
    net = models.resnet18(weights=None, num_classes=3).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    out = tmp_path / "out"
    code, stderr = _prune(str(tmp_path / "r18.safetensors"), "--factory", "torchvision.resnet18:3", "--calibration",
                          str(folder), "--eval", str(folder), "--method", "wanda", "--sparsity", "0.5",
                          "--samples", "6", "--batch-size", "3", "--out", str(out), "--quiet")
    assert code == 0, stderr
    pruned = load_file(str(out / "r18.safetensors"))
    again = models.resnet18(weights=None, num_classes=3)
    again.load_state_dict(pruned)
    conv = pruned["layer2.0.conv1.weight"]
    assert float((conv == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # Wanda per output row on the conv's unfolded inputs: every row keeps half its weights
    assert ((conv.flatten(1) != 0).sum(1) == conv[0].numel() // 2).all()
    report = (out / "report.json").read_text()
    assert "accuracy" in report
