"""Two ranks on gloo: DDP clipping sees the global norm, ranks agree on masks, `secateurs run`
under torchrun matches the single-process run and resumes from rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import QUICK_RUN, assert_same_tensors
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from secateurs import clip
from secateurs.errors import SecateursError
from secateurs.experiment import distributed
from secateurs.experiment.config import load_config
from secateurs.experiment.data import Split, batches
from secateurs.prune import Pruner

if not dist.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: object, out: Path, *args: object) -> list[dict]:
    """Run ``worker(rank, 2, port, out, *args)`` on two gloo ranks; return what each saved."""
    mp.spawn(worker, args=(2, free_port(), str(out), *args), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own data, on purpose unlike the other's."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 6, generator=g) * (1 + 3 * rank), torch.randint(0, 3, (8,), generator=g)


# --- the Python API inside a DDP process -------------------------------------------------------


def _api_worker(rank: int, world: int, port: int, out: str) -> None:
    join(rank, world, port)
    try:
        result: dict = {}
        model = net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = clip.wrap(torch.optim.SGD(model.parameters(), lr=0.1), clip.GlobalNorm(0.5))
        x, y = batch(rank)
        F.cross_entropy(ddp(x), y).backward()
        result["averaged_grads"] = [p.grad.clone() for p in model.parameters()]
        opt.step()
        result["norm"] = opt.log.norms()[0]
        result["clipped_grads"] = [p.grad.clone() for p in model.parameters()]

        pruner = Pruner(net(), sparsity=0.6, criterion="gradient")
        pruner.score([batch(rank)], F.cross_entropy)
        pruner.step()
        result["masks"] = pruner.masks
        distributed.check_same_on_every_rank("masks", distributed.checksum(pruner.masks))

        try:
            distributed.check_same_on_every_rank("masks after step 1", "aaaa" if rank == 0 else "bbbb")
        except SecateursError as exc:
            result["mismatch"] = str(exc)

        from secateurs.experiment.run import start

        try:
            start(load_config(overrides=["data.batch_size=63"]), Path(out) / "odd-batch", progress=False)
        except SecateursError as exc:
            result["odd_batch"] = str(exc)
        result["odd_batch_written"] = (Path(out) / "odd-batch").exists()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def api_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(_api_worker, tmp_path_factory.mktemp("api"))


def one_process_grads() -> list[torch.Tensor]:
    """Gradients of the mean loss over both ranks' batches, in one process (equal batch sizes)."""
    model = net()
    (x0, y0), (x1, y1) = batch(0), batch(1)
    F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.slow
def test_clip_norm_on_each_rank_equals_the_norm_of_the_ddp_averaged_gradients(api_ranks: list[dict]) -> None:
    for r in api_ranks:
        expected = torch.nn.utils.get_total_norm(r["averaged_grads"])
        assert r["norm"] == pytest.approx(float(expected), rel=1e-6)
    assert api_ranks[0]["norm"] == api_ranks[1]["norm"]


@pytest.mark.slow
def test_ddp_averaged_gradients_are_the_one_process_gradients_of_all_the_data(api_ranks: list[dict]) -> None:
    reference = one_process_grads()
    for r in api_ranks:
        for got, want in zip(r["averaged_grads"], reference, strict=True):
            torch.testing.assert_close(got, want)
    assert api_ranks[0]["norm"] == pytest.approx(float(torch.nn.utils.get_total_norm(reference)), rel=1e-5)


@pytest.mark.slow
def test_clipped_gradients_are_identical_on_both_ranks(api_ranks: list[dict]) -> None:
    assert api_ranks[0]["norm"] > 0.5  # the rule did clip
    for a, b in zip(api_ranks[0]["clipped_grads"], api_ranks[1]["clipped_grads"], strict=True):
        assert torch.equal(a, b)
    assert float(torch.nn.utils.get_total_norm(api_ranks[0]["clipped_grads"])) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.slow
def test_gradient_masks_from_different_data_are_identical_and_those_of_all_the_data(api_ranks: list[dict]) -> None:
    together = Pruner(net(), sparsity=0.6, criterion="gradient")
    together.score([batch(0), batch(1)], F.cross_entropy)
    together.step()
    for name, mask in api_ranks[0]["masks"].items():
        assert torch.equal(mask, api_ranks[1]["masks"][name]), name
        assert torch.equal(mask, together.masks[name]), name


@pytest.mark.slow
def test_a_mask_mismatch_stops_every_rank_with_a_clear_error(api_ranks: list[dict]) -> None:
    for r in api_ranks:
        assert r["mismatch"].startswith("masks after step 1: ranks disagree (rank 0: aaaa, rank 1: bbbb)")


@pytest.mark.slow
def test_a_batch_size_the_ranks_cannot_split_is_refused_before_anything_is_written(api_ranks: list[dict]) -> None:
    for r in api_ranks:
        assert r["odd_batch"].startswith("data.batch_size: got 63; allowed: a multiple of the world size 2")
        assert not r["odd_batch_written"]


def test_checksum_sees_names_shapes_and_values() -> None:
    masks = {"a": torch.tensor([True, False, True]), "b": torch.ones(2, 2, dtype=torch.bool)}
    assert distributed.checksum(masks) == distributed.checksum(dict(reversed(masks.items())))
    assert distributed.checksum(masks) != distributed.checksum({**masks, "a": torch.tensor([True, True, False])})
    assert distributed.checksum(masks) != distributed.checksum({**masks, "b": torch.ones(4, dtype=torch.bool)})
    assert distributed.checksum(masks) != distributed.checksum({"c": masks["a"], "b": masks["b"]})


def test_one_process_helpers_are_no_ops() -> None:
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    model = nn.Linear(2, 2)
    assert distributed.wrap_ddp(model) is model
    distributed.check_same_on_every_rank("masks", "anything")
    loss = torch.tensor(0.25)
    assert distributed.all_mean(loss) is loss and distributed.any_rank(True)


@pytest.mark.parametrize("n", [10, 11])
def test_batches_shard_the_data_as_distributed_sampler_does(n: int) -> None:
    split = Split(torch.arange(n).float()[:, None], torch.arange(n))
    for rank in range(2):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=7)
        ours = torch.cat([y for _, y in batches(split, 3, seed=7, rank=rank, world_size=2)])
        assert ours.tolist() == list(sampler)


# --- secateurs run on two ranks ----------------------------------------------------------------

# digits at full size, few epochs: enough to converge, so both runs land near the same accuracy
CONVERGING_RUN = ["train.threads=1", "train.epochs=6", "prune.epochs=3", "prune.finetune_epochs=3"]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "secateurs", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.slow
def test_torchrun_run_reports_world_size_2_and_the_single_process_accuracy(tmp_path: Path) -> None:
    from secateurs.experiment.run import start

    result = _torchrun("run", "--quiet", "--out", "two", *_sets(CONVERGING_RUN), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = start(load_config(overrides=CONVERGING_RUN), tmp_path / "one", progress=False)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["final"]["accuracy"] == pytest.approx(one["final"]["accuracy"], abs=0.02)
    assert two["final"]["sparsity"] == pytest.approx(one["final"]["sparsity"])
    assert two["clip"]["total_steps"] == one["clip"]["total_steps"]  # the global batch is the configured one
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


RESUMED_RUN = [*QUICK_RUN, "train.threads=1", "prune.criterion=gradient"]
STRUCTURED_RUN = [*QUICK_RUN, "train.threads=1", "prune.kind=structured", "prune.sparsity=0.5", "prune.criterion=taylor"]


def _runs_worker(rank: int, world: int, port: int, out: str) -> None:
    """A run, the same run killed after a checkpoint and resumed, and a structured run."""
    from secateurs.experiment import run

    join(rank, world, port)
    try:
        cfg = load_config(overrides=RESUMED_RUN)
        whole = run.start(cfg, Path(out) / "whole", progress=False)

        original = run.Run.save_checkpoint

        def killed_after_epoch_4(self: run.Run) -> None:
            original(self)
            if self.state.epoch == 4:  # after the first epoch of the prune phase
                raise run.Interrupted

        run.Run.save_checkpoint = killed_after_epoch_4  # type: ignore[method-assign]
        try:
            run.start(cfg, Path(out) / "resumed", progress=False)
        except run.Interrupted:
            pass
        finally:
            run.Run.save_checkpoint = original  # type: ignore[method-assign]
        resumed = run.resume(Path(out) / "resumed", progress=False)
        structured = run.start(load_config(overrides=STRUCTURED_RUN), Path(out) / "structured", progress=False)
        result = {"whole": whole, "resumed": resumed, "structured": structured}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("runs")
    return out, spawn(_runs_worker, out)


@pytest.mark.slow
def test_a_two_rank_run_resumes_from_rank_0s_checkpoint_bit_for_bit(two_rank_runs: tuple[Path, list[dict]]) -> None:
    out, ranks = two_rank_runs
    assert_same_tensors(out / "whole" / "model.safetensors", out / "resumed" / "model.safetensors")
    for r in ranks:
        assert r["resumed"]["history"] == ranks[0]["whole"]["history"]
        assert _without_latency(r["resumed"]["final"]) == _without_latency(ranks[0]["whole"]["final"])
    assert json.loads((out / "resumed" / "report.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_two_rank_structured_run_removes_the_same_channels_on_both_ranks(two_rank_runs: tuple[Path, list[dict]]) -> None:
    out, ranks = two_rank_runs
    first, second = (r["structured"] for r in ranks)
    assert first["history"] == second["history"]
    assert _without_latency(first["final"]) == _without_latency(second["final"])
    assert first["final"]["params"] < 0.5 * first["dense"]["params"]
    assert json.loads((out / "structured" / "report.json").read_text())["world_size"] == 2


def _without_latency(final: dict) -> dict:
    return {k: v for k, v in final.items() if k != "latency_ms"}
