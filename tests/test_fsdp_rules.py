"""FSDP2 (``fully_shard``) on two real gloo ranks, CPU: every mask criterion and every clip rule
gives what one process gives on the unsharded model.

Each rank trains on its own half of the data; FSDP2 averages the gradients over the ranks, so
the reference is one process on the whole batch (equal halves: the mean loss is the same).
``Linear(12, 3)`` has 3 rows over 2 ranks (an uneven shard) and its bias is sharded too: a
missing cross-shard reduction (a bias is one AGC unit, a norm spans both shards) shows up.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import batch, join, net, spawn
from test_fsdp import sharded
from torch.nn import functional as F

from secateurs import clip
from secateurs.prune import Pruner, make_criterion

pytestmark = pytest.mark.slow

CRITERIA = ["magnitude", "gradient", "activation", "taylor", "movement", "random", "synflow"]
RULES = {
    "value": lambda: clip.Value(0.05),
    "norm": lambda: clip.Norm(0.3),
    "global_norm": lambda: clip.GlobalNorm(0.5),
    "agc": lambda: clip.AGC(0.05),
    "autoclip": lambda: clip.AutoClip(percentile=50),
    "zclip": lambda: clip.ZClip(warmup_steps=1),
    "adagc": clip.AdaGC,
    "chain": lambda: clip.Chain(clip.AGC(0.05), clip.GlobalNorm(0.5)),
}
STEPS = 3


def step_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(rank + 2 * step)


def whole_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    (x0, y0), (x1, y1) = step_batch(0, step), step_batch(1, step)
    return torch.cat([x0, x1]), torch.cat([y0, y1])


def prune_with(model: torch.nn.Module, criterion: str, data: object) -> Pruner:
    """Score (or train, for movement) and prune to 50%."""
    options = {"random": {"seed": 7}, "synflow": {"input_shape": (6,), "iterations": 20}}
    chosen = make_criterion(criterion, **options.get(criterion, {}))
    pruner = Pruner(model, sparsity=0.5, criterion=chosen)
    if criterion == "movement":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pruner.attach(opt)
        for step in range(STEPS):
            opt.zero_grad()
            x, y = data(step)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    elif pruner.requires_data:
        pruner.score([data(0)], F.cross_entropy)
    pruner.step()
    return pruner


def clip_with(model: torch.nn.Module, rule: str, data: object) -> list[dict]:
    """STEPS wrapped SGD steps; per step the stats and the clipped gradients (whole)."""
    opt = clip.wrap(torch.optim.SGD(model.parameters(), lr=0.1), RULES[rule]())
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = data(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        grads = [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in model.parameters()]
        out.append({"grads": [g.detach().clone() for g in grads]})
    for row, norm, after, threshold in zip(out, opt.log.norms(), opt.log.norms_after(), opt.log.thresholds(), strict=True):
        row.update(norm=norm, after=after, threshold=threshold)
    return out


def synflow_record(model: torch.nn.Module) -> dict:
    """Synflow scores of the dense model, a step to 50%, the scores under those masks, and what
    the model holds afterwards (whole tensors)."""
    pruner = Pruner(model, sparsity=0.5, criterion=make_criterion("synflow", input_shape=(6,), iterations=5))
    scores = pruner.scores()
    pruner.step()
    return {
        "scores": scores,
        "masks": pruner.masks,
        "masked_scores": pruner.scores(),
        "weights": {n: getattr(p, "full_tensor", p.detach)().detach().clone() for n, p in model.named_parameters()},
        "grads": [p.grad for p in model.parameters()],
        "training": model.training and all(m.training for m in model.modules()),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join(rank, world, port)
    try:
        result: dict = {"masks": {}, "clips": {}}
        for criterion in CRITERIA:
            pruner = prune_with(sharded(net()), criterion, lambda step: step_batch(rank, step))
            result["masks"][criterion] = pruner.masks
        result["synflow"] = synflow_record(sharded(net()))
        for rule in RULES:
            result["clips"][rule] = clip_with(sharded(net()), rule, lambda step: step_batch(rank, step))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(_worker, tmp_path_factory.mktemp("fsdp_rules"))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_masks_under_fully_shard_are_the_masks_of_the_unsharded_model(ranks: list[dict], criterion: str) -> None:
    whole = prune_with(net(), criterion, whole_batch)
    for r in ranks:
        masks = r["masks"][criterion]
        assert sorted(masks) == sorted(whole.masks)
        for name, mask in whole.masks.items():
            assert torch.equal(masks[name], mask), name


def test_synflow_scores_under_fully_shard_are_the_scores_of_the_unsharded_model(ranks: list[dict]) -> None:
    # synflow runs the all-positive network through the sharded module itself (no rank holds
    # a whole copy), in float32 there against the float64 copy of one process
    whole = synflow_record(net())
    for r in ranks:
        for key in ("scores", "masked_scores"):
            assert sorted(r["synflow"][key]) == sorted(whole[key])
            for name, score in whole[key].items():
                torch.testing.assert_close(r["synflow"][key][name].double(), score, rtol=2e-6, atol=0)
        masked = whole["masked_scores"]["2.weight"]
        assert torch.all(masked[~whole["masks"]["2.weight"]] == 0) and masked.min() < whole["scores"]["2.weight"].min()


def test_synflow_under_fully_shard_puts_every_shard_back_exactly(ranks: list[dict]) -> None:
    # the forward ran on |w| with pruned weights zero: the weights (biases included, which
    # have negative entries) must come back bit for bit, times the mask, with no gradient
    reference = dict(net().named_parameters())
    for r in ranks:
        got = r["synflow"]
        assert got["training"] and got["grads"] == [None] * len(reference)
        assert any((p < 0).any() for p in reference.values())
        for name, weight in reference.items():
            want = weight.detach() * got["masks"][name] if name in got["masks"] else weight.detach()
            assert torch.equal(got["weights"][name], want), name


@pytest.mark.parametrize("rule", RULES)
def test_clipping_under_fully_shard_equals_the_unsharded_model(ranks: list[dict], rule: str) -> None:
    reference = clip_with(net(), rule, whole_batch)
    for r in ranks:
        for step, (got, want) in enumerate(zip(r["clips"][rule], reference, strict=True)):
            for key in ("norm", "after", "threshold"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
            for g, w in zip(got["grads"], want["grads"], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    clipped = [s["after"] < s["norm"] * (1 - 1e-6) for s in reference]
    assert any(clipped), "the reference never clipped: the test would not see a wrong factor"
