"""Under torch.distributed every rank selects the same masks from its own data (2-process gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from secateurs.prune import Pruner, make_criterion

DATA_CRITERIA = ("gradient", "taylor", "activation", "movement")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 6, generator=g) * (1 + 3 * rank), torch.randint(0, 3, (8,), generator=g)


def masks_for(criterion: str, batches: list) -> dict[str, torch.Tensor]:
    pruner = Pruner(model(), sparsity=0.6, criterion=criterion)
    pruner.score(batches, nn.functional.cross_entropy)
    pruner.step()
    return pruner.masks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {name: masks_for(name, [batch(rank)]) for name in DATA_CRITERIA}
        torch.manual_seed(rank)  # different global RNG per rank: the random seed is broadcast
        random_pruner = Pruner(model(), sparsity=0.6, criterion=make_criterion("random"))
        random_pruner.step()
        result["random"] = random_pruner.masks
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_with_different_data_select_the_masks_of_all_the_data(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in (*DATA_CRITERIA, "random"):
        for key in ranks[0][name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
    for name in DATA_CRITERIA:
        alone = masks_for(name, [batch(0)])
        together = masks_for(name, [batch(0), batch(1)])
        for key, mask in ranks[0][name].items():
            assert torch.equal(mask, together[key]), (name, key)
        assert any(not torch.equal(ranks[0][name][k], alone[k]) for k in alone), name
