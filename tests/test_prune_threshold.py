"""Pruning by an absolute threshold (the seeds' ``threshold = 0.1``), beside pruning to a fraction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.prune import Pruner, pruning_record, structured
from secateurs.prune.selection import nm_keep


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def test_threshold_prunes_exactly_the_weights_scoring_below_it() -> None:
    model = mlp()
    weights = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    reached = Pruner(model, threshold=0.1, criterion="magnitude").step()
    for i, before in zip((0, 2, 4), weights, strict=True):
        kept = before.abs() >= 0.1
        torch.testing.assert_close(model[i].weight.detach(), torch.where(kept, before, torch.zeros(())))
    below = sum(int((w.abs() < 0.1).sum()) for w in weights)
    assert reached == pytest.approx(below / sum(w.numel() for w in weights))
    assert 0.0 < reached < 1.0


def test_threshold_keeps_earlier_prunes_and_per_layer_entries_their_sparsity() -> None:
    model = mlp()
    pruner = Pruner(model, threshold=0.05, per_layer={"4": 0.5})
    w0 = model[0].weight.detach().clone()
    pruner.step()
    assert torch.equal(pruner.masks["0.weight"], w0.abs() >= 0.05)
    assert pruner.layer_sparsity()["4.weight"] == pytest.approx(0.5)
    # raising the weights of pruned entries cannot revive them: pruned stays pruned
    with torch.no_grad():
        model[0].weight.add_(1.0)
    pruner.step()
    assert torch.equal(pruner.masks["0.weight"], w0.abs() >= 0.05)


def test_threshold_with_a_pattern_applies_the_blocks_first() -> None:
    model = mlp()
    before = model[0].weight.detach().clone()
    pruner = Pruner(model, threshold=0.1, pattern="2:4", targets=["0"])
    pruner.step()
    expected = nm_keep(before.abs(), 2, 4) & (before.abs() >= 0.1)
    assert torch.equal(pruner.masks["0.weight"], expected)


def test_step_with_a_sparsity_overrides_the_threshold() -> None:
    pruner = Pruner(mlp(), threshold=0.1)
    assert pruner.step(0.5) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("kwargs", [{"threshold": float("nan")}, {"threshold": "0.1"}, {"sparsity": 0.5, "threshold": 0.1}])
def test_bad_threshold_names_the_argument(kwargs: dict) -> None:
    with pytest.raises(SecateursError, match=r"^(threshold|sparsity/threshold): got"):
        Pruner(mlp(), **kwargs)


def test_structured_threshold_removes_every_unit_scoring_below_it() -> None:
    model = mlp()
    # group magnitude of hidden unit c of the first layer: its row of 0.weight (and bias: no) and
    # its column of 2.weight, squared and summed
    scores = model[0].weight.detach().pow(2).sum(1) + model[2].weight.detach().pow(2).sum(0)
    threshold = float(scores.median())
    small = structured(model, torch.zeros(1, 16), threshold=threshold, max_layer_sparsity=1.0)
    assert small[0].out_features == int((scores >= threshold).sum())
    kept = torch.nonzero(scores >= threshold).flatten()
    torch.testing.assert_close(small[0].weight, model[0].weight[kept])
    record = pruning_record(small)
    assert record is not None
    groups = record["groups"]
    expected = 1 - sum(g["kept"] for g in groups.values()) / sum(g["units"] for g in groups.values())
    assert record["sparsity"] == pytest.approx(expected)
    assert record["sparsity"] > 0


def test_structured_threshold_never_empties_a_layer() -> None:
    small = structured(mlp(), torch.zeros(1, 16), threshold=1e9)
    assert small[0].out_features == 4  # max_layer_sparsity=0.9 keeps ceil(32 * 0.1)
    assert small[2].out_features == 1


def test_one_shot_schedule_prunes_below_the_threshold_and_ramps_refuse_it() -> None:
    from secateurs.prune.schedules import AGP, Iterative, OneShot

    model = mlp()
    below = sum(int((model[i].weight.abs() < 0.1).sum()) for i in (0, 2, 4))
    total = sum(model[i].weight.numel() for i in (0, 2, 4))
    schedule = OneShot(Pruner(model, threshold=0.1), at=1)
    assert not schedule.prunes_next() and not schedule.step()
    assert schedule.prunes_next() and schedule.step()
    assert schedule.sparsity == pytest.approx(below / total)
    for ramp in (lambda p: AGP(p, start=0, end=3), lambda p: Iterative(p, rounds=2, finetune_epochs=1)):
        with pytest.raises(SecateursError, match=r"^pruner: got 'a Pruner with threshold=0\.1'; allowed: a Pruner with a sparsity"):
            ramp(Pruner(mlp(), threshold=0.1))
