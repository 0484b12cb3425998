"""FSDP2 (`fully_shard`) on two gloo ranks, CPU: global-norm clipping of DTensor gradients and
pruning masks on sharded weights give what one process gives on the whole model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import batch, join, net, spawn
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn import functional as F

from secateurs import clip
from secateurs.prune import Pruner

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch < 2.6 has FSDP2 only under _composable
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

pytestmark = pytest.mark.slow


def sharded(model: nn.Module) -> nn.Module:
    # a CPU mesh even where CUDA exists (fully_shard's default mesh follows the accelerator)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    join(rank, world, port)
    try:
        result: dict = {}
        model = sharded(net())  # Linear(12, 3): 3 rows over 2 ranks, an uneven shard
        opt = clip.wrap(torch.optim.SGD(model.parameters(), lr=0.1), clip.GlobalNorm(0.5))
        x, y = batch(rank)
        F.cross_entropy(model(x), y).backward()
        result["grad_types"] = sorted({type(p.grad).__name__ for p in model.parameters()})
        opt.step()
        result["norm"] = opt.log.norms()[0]
        result["clipped_grads"] = [p.grad.full_tensor() for p in model.parameters()]

        model = sharded(net())
        pruner = Pruner(model, sparsity=0.5)
        pruner.step()
        result["masks"] = pruner.masks
        adam = clip.wrap(torch.optim.AdamW(model.parameters(), lr=0.05), clip.GlobalNorm(1.0))
        pruner.attach(adam)
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            adam.step()
            adam.zero_grad()
        result["trained_weights"] = {name: p.full_tensor() for name, p in model.named_parameters()}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(_fsdp_worker, tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_gradients_are_dtensors(fsdp_ranks: list[dict]) -> None:
    assert fsdp_ranks[0]["grad_types"] == ["DTensor"]


def test_global_norm_of_sharded_gradients_is_the_one_process_norm_of_all_the_data(fsdp_ranks: list[dict]) -> None:
    model = net()
    (x0, y0), (x1, y1) = batch(0), batch(1)
    F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
    reference = clip.wrap(torch.optim.SGD(model.parameters(), lr=0.1), clip.GlobalNorm(0.5))
    reference.step()
    for r in fsdp_ranks:
        assert r["norm"] == pytest.approx(reference.log.norms()[0], rel=1e-5)
        assert r["norm"] > 0.5  # so the gradients below were clipped
        for got, p in zip(r["clipped_grads"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad)


def test_masks_on_sharded_weights_are_the_masks_of_the_whole_model(fsdp_ranks: list[dict]) -> None:
    whole = Pruner(net(), sparsity=0.5)
    whole.step()
    for r in fsdp_ranks:
        assert sorted(r["masks"]) == sorted(whole.masks)
        for name, mask in whole.masks.items():
            assert torch.equal(r["masks"][name], mask), name


def test_pruned_sharded_weights_stay_zero_through_training(fsdp_ranks: list[dict]) -> None:
    for r in fsdp_ranks:
        for name, mask in r["masks"].items():
            weight = r["trained_weights"][name]
            assert torch.all(weight[~mask] == 0), name
            assert torch.all(weight[mask] != 0), name
    for name, weight in fsdp_ranks[0]["trained_weights"].items():
        assert torch.equal(weight, fsdp_ranks[1]["trained_weights"][name]), name
