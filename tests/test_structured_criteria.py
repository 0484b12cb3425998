"""Group criteria: each equals a hand computation on a tiny Linear-ReLU-Linear network."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from secateurs.errors import SecateursError
from secateurs.prune import Pruner
from secateurs.prune.surgery import structured
from secateurs.prune.surgery.criteria import (
    GROUP_CRITERIA,
    GroupActivation,
    GroupBNScale,
    GroupGradient,
    GroupMagnitude,
    GroupRandom,
    GroupTaylor,
    GroupTaylorAbs,
    make_group_criterion,
)


def tiny() -> tuple[nn.Sequential, tp.Group]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 4))
    return net, dg.get_pruning_group(net[0], tp.prune_linear_out_channels, [0, 1, 2])


BATCHES = [
    (torch.randn(5, 4, generator=torch.Generator().manual_seed(s)), torch.tensor([0, 1, 0, 1, 1]))
    for s in range(3)
]


def observe(criterion, net: nn.Module, group: tp.Group, *, loss: bool) -> torch.Tensor:
    criterion.start(net, [group])
    for x, y in BATCHES:
        net.zero_grad()
        if loss:
            F.cross_entropy(net(x), y).backward()
        else:
            with torch.no_grad():
                net(x)
        criterion.observe([group])
    criterion.stop()
    return criterion(group)


def test_magnitude_is_the_squared_l2_norm_of_filter_and_input_column() -> None:
    net, group = tiny()
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    expected = (w1**2).sum(1) + (w2**2).sum(0)
    torch.testing.assert_close(GroupMagnitude()(group), expected.double())


def test_magnitude_p1_is_the_l1_norm() -> None:
    net, group = tiny()
    expected = net[0].weight.detach().abs().sum(1) + net[2].weight.detach().abs().sum(0)
    torch.testing.assert_close(GroupMagnitude(p=1)(group), expected.double())


def test_gradient_is_the_mean_over_batches_of_summed_absolute_gradients() -> None:
    net, group = tiny()
    expected = torch.zeros(3, dtype=torch.float64)
    for x, y in BATCHES:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        expected += (net[0].weight.grad.abs().sum(1) + net[2].weight.grad.abs().sum(0)).double()
    got = observe(GroupGradient(), net, group, loss=True)
    torch.testing.assert_close(got, expected / len(BATCHES))


def test_taylor_abs_is_the_summed_absolute_weight_times_gradient_averaged_over_batches() -> None:
    net, group = tiny()
    expected = torch.zeros(3, dtype=torch.float64)
    for x, y in BATCHES:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        l1, l2 = net[0], net[2]
        saliency = (l1.weight * l1.weight.grad).abs().sum(1) + (l2.weight * l2.weight.grad).abs().sum(0)
        expected += saliency.detach().double()
    got = observe(GroupTaylorAbs(), net, group, loss=True)
    torch.testing.assert_close(got, expected / len(BATCHES))


def test_taylor_is_the_mask_taylor_score_summed_over_each_channel() -> None:
    net, group = tiny()
    mean_grads = [torch.zeros_like(net[0].weight), torch.zeros_like(net[2].weight)]
    for x, y in BATCHES:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        mean_grads[0] += net[0].weight.grad / len(BATCHES)
        mean_grads[1] += net[2].weight.grad / len(BATCHES)
    # the per-weight score of the mask criterion "taylor": |w * mean g|
    pruner = Pruner(net, sparsity=0.5, criterion="taylor")
    pruner.score(BATCHES, F.cross_entropy)
    per_weight = pruner.scores()
    torch.testing.assert_close(per_weight["0.weight"], (net[0].weight * mean_grads[0]).abs().detach())
    expected = per_weight["0.weight"].sum(1) + per_weight["2.weight"].sum(0)
    got = observe(GroupTaylor(), net, group, loss=True)
    torch.testing.assert_close(got, expected.double())


def test_activation_is_mean_absolute_input_times_the_weights_reading_it() -> None:
    net, group = tiny()
    with torch.no_grad():
        hidden = torch.cat([torch.relu(net[0](x)) for x, _ in BATCHES])
    expected = hidden.abs().mean(0).double() * net[2].weight.detach().abs().sum(0).double()
    got = observe(GroupActivation(), net, group, loss=False)
    torch.testing.assert_close(got, expected)


def test_bn_scale_is_the_absolute_batchnorm_weight() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 1, 6, 6))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    torch.testing.assert_close(GroupBNScale()(group), torch.tensor([0.5, 2.0, 0.1, 1.0], dtype=torch.float64))


def test_bn_scale_cannot_score_a_group_without_normalisation() -> None:
    _, group = tiny()
    assert GroupBNScale()(group) is None


def test_random_is_reproducible_from_its_seed() -> None:
    _, group = tiny()
    torch.testing.assert_close(GroupRandom(seed=3)(group), GroupRandom(seed=3)(group))
    assert not torch.equal(GroupRandom(seed=3)(group), GroupRandom(seed=4)(group))


def test_criteria_are_registered_by_name() -> None:
    assert set(GROUP_CRITERIA) == {"magnitude", "taylor", "taylor_abs", "gradient", "activation", "bn_scale", "random"}
    assert isinstance(make_group_criterion("taylor"), GroupTaylor)
    with pytest.raises(SecateursError, match="criterion: got 'l2'"):
        make_group_criterion("l2")


def test_magnitude_removes_the_weakest_neurons() -> None:
    net, _ = tiny()
    with torch.no_grad():
        net[0].weight[1] *= 0.01
        net[2].weight[:, 1] *= 0.01
    small = structured(net, torch.zeros(1, 4), sparsity=0.3)
    keep = [0, 2]
    torch.testing.assert_close(small[0].weight, net[0].weight[keep])


@pytest.mark.parametrize("name", ["taylor", "gradient", "activation"])
def test_data_criteria_prune_the_zoo_cnn_with_batches(name: str) -> None:
    from secateurs.experiment.models import build_model

    torch.manual_seed(0)
    model = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    small = structured(model, batches[0][0], sparsity=0.5, criterion=name, batches=batches)
    assert [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)] == [16, 32, 32]
    assert all(p.grad is None for p in small.parameters())


def test_data_criteria_accept_a_one_shot_iterator_over_several_rounds() -> None:
    net, _ = tiny()
    batches = iter([(x, y) for x, y in BATCHES])
    small = structured(net, torch.zeros(1, 4), sparsity=0.6, criterion="taylor", batches=batches, rounds=2)
    assert small[0].out_features == 1


@pytest.mark.parametrize("name", ["taylor", "gradient", "activation"])
def test_data_criteria_without_batches_are_refused(name: str) -> None:
    net, _ = tiny()
    with pytest.raises(SecateursError, match=f"batches: got None.*criterion '{name}' reads data"):
        structured(net, torch.zeros(1, 4), sparsity=0.5, criterion=name)


def test_empty_batches_are_refused() -> None:
    net, _ = tiny()
    with pytest.raises(SecateursError, match="batches: got 'an empty iterable'"):
        structured(net, torch.zeros(1, 4), sparsity=0.5, criterion="gradient", batches=[])


def test_bn_scale_on_a_model_without_normalisation_is_refused() -> None:
    net, _ = tiny()
    with pytest.raises(SecateursError, match="criterion: got 'bn_scale'"):
        structured(net, torch.zeros(1, 4), sparsity=0.5, criterion="bn_scale")
