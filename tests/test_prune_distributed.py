"""Under torch.distributed every rank selects the same masks from its own data (2-process gloo)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import batch, join, net, spawn
from torch import nn

from secateurs.prune import Pruner, make_criterion

DATA_CRITERIA = ("gradient", "taylor", "activation", "movement")


def masks_for(criterion: str, batches: list) -> dict[str, torch.Tensor]:
    pruner = Pruner(net(), sparsity=0.6, criterion=criterion)
    pruner.score(batches, nn.functional.cross_entropy)
    pruner.step()
    return pruner.masks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join(rank, world, port)
    try:
        result = {name: masks_for(name, [batch(rank)]) for name in DATA_CRITERIA}
        torch.manual_seed(rank)  # different global RNG per rank: the random seed is broadcast
        random_pruner = Pruner(net(), sparsity=0.6, criterion=make_criterion("random"))
        random_pruner.step()
        result["random"] = random_pruner.masks
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_with_different_data_select_the_masks_of_all_the_data(tmp_path):
    ranks = spawn(_worker, tmp_path)
    for name in (*DATA_CRITERIA, "random"):
        for key in ranks[0][name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
    for name in DATA_CRITERIA:
        alone = masks_for(name, [batch(0)])
        together = masks_for(name, [batch(0), batch(1)])
        for key, mask in ranks[0][name].items():
            assert torch.equal(mask, together[key]), (name, key)
        assert any(not torch.equal(ranks[0][name][k], alone[k]) for k in alone), name
