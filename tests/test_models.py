"""The model zoo: shapes, the seed CNN's exact parameter count, one training step each."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from secateurs.errors import SecateursError
from secateurs.experiment.models import MODELS, build_model


def test_seed_cnn_matches_the_keras_tutorial_on_cifar_shapes() -> None:
    # The seed's Keras model summary: 122,570 trainable parameters on 32x32x3 inputs.
    model = build_model("seed-cnn", input_shape=(3, 32, 32), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 122_570
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64]
    assert all(c.padding == (0, 0) for c in convs)


def test_seed_cnn_uses_same_padding_on_digits() -> None:
    model = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.padding == (1, 1) for c in convs)
    assert model.classifier[1].in_features == 64 * 2 * 2


def test_mlp_has_the_lenet_300_100_shape() -> None:
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 300), (300, 100), (100, 10)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_trains_one_step_on_digits_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert model(x).shape == (16, 10)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=False))


def test_user_factory_by_import_path() -> None:
    model = build_model("secateurs.experiment.models:MLP", input_shape=(1, 8, 8), num_classes=3)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_bad_model_names_are_clear_errors() -> None:
    with pytest.raises(SecateursError, match=r"model\.name: got .alexnet."):
        build_model("alexnet", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(SecateursError, match="does not import"):
        build_model("no_such_package.mod:factory", input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_prunes_to_the_target(name: str) -> None:
    from secateurs import prune

    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    pruner = prune.Pruner(model, sparsity=0.8)
    assert pruner.step() == pytest.approx(0.8, abs=1e-3)
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in pruner.masks)
    total = sum(m.numel() for m in pruner.masks.values())
    assert zeros / total == pytest.approx(0.8, abs=1e-3)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
