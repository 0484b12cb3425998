"""The Lightning callbacks in a real `lightning.Trainer` on CPU: clipping, pruning, checkpoints."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from secateurs import clip, prune  # noqa: E402
from secateurs.errors import SecateursError  # noqa: E402
from secateurs.integrations.lightning import GradientClipping, Pruning  # noqa: E402

STEPS_PER_EPOCH = 8


class Classifier(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16 * STEPS_PER_EPOCH, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].argmax(dim=1)), batch_size=16)


def trainer(tmp_path: Path, epochs: int, callbacks: list[pl.Callback], **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs,
    )


def agp() -> Pruning:
    """0.8 sparsity by AGP over epochs 0, 1, 2: 0.0, 0.7, 0.8."""
    return Pruning(0.8, schedule="agp", schedule_options={"end": 2})


class GradProbe(pl.Callback):
    """Listed after Pruning and GradientClipping: records what the optimizer is about to use."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning = pruning
        self.pruned_grads_zero: list[bool] = []
        self.masks_at_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruning.pruner is not None
        self.masks_at_start = {k: v.clone() for k, v in self.pruning.pruner.masks.items()}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        assert self.pruning.pruner is not None
        params = dict(pl_module.named_parameters())
        self.pruned_grads_zero.append(
            all(bool((params[name].grad[~mask] == 0).all()) for name, mask in self.pruning.pruner.masks.items())
        )


def logged(tmp_path: Path, column: str) -> list[float]:
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Classifier, Pruning, GradientClipping, GradProbe]:
    tmp_path = tmp_path_factory.mktemp("fit")
    model, pruning, clipping = Classifier(), agp(), GradientClipping("global_norm", max_norm=0.5)
    probe = GradProbe(pruning)
    trainer(tmp_path, 4, [pruning, clipping, probe]).fit(model, loader())
    return tmp_path, model, pruning, clipping, probe


def test_trainer_clips_every_step_and_logs_the_norm(fitted: tuple) -> None:
    tmp_path, _, _, clipping, _ = fitted
    assert clipping.clip_log.total_steps == 4 * STEPS_PER_EPOCH
    assert 0 < clipping.clip_log.clipped_steps <= clipping.clip_log.total_steps
    norms = logged(tmp_path, "clip/grad_norm")
    assert norms == pytest.approx(clipping.clip_log.norms(), rel=1e-6)
    clipped = [n for n, c in zip(clipping.clip_log.norms(), clipping.clip_log.clipped(), strict=True) if c]
    assert all(n > 0.5 for n in clipped)
    assert clipping.clip_log.norms_after() == pytest.approx([min(n, 0.5) for n in norms], rel=1e-5)


def test_trainer_prunes_to_the_target_on_the_schedule(fitted: tuple) -> None:
    tmp_path, model, pruning, _, _ = fitted
    assert pruning.pruner.current_sparsity == pytest.approx(0.8, abs=1e-3)
    assert logged(tmp_path, "prune/sparsity") == pytest.approx([0.0, 0.7, 0.8, 0.8], abs=1e-3)
    params = dict(model.named_parameters())
    for name, mask in pruning.pruner.masks.items():
        assert torch.all(params[name][~mask] == 0) and torch.all(params[name][mask] != 0), name


def test_pruning_listed_first_keeps_pruned_weights_out_of_the_clip_norm(fitted: tuple) -> None:
    _, _, _, _, probe = fitted
    assert len(probe.pruned_grads_zero) == 4 * STEPS_PER_EPOCH and all(probe.pruned_grads_zero)


def test_pruned_module_deep_copies_and_saves_sparse(fitted: tuple, tmp_path: Path) -> None:
    _, model, pruning, _, _ = fitted
    twin = copy.deepcopy(model)
    assert list(twin.state_dict()) == list(model.state_dict())  # no weight_orig / weight_mask
    size = pruning.save(tmp_path / "model.safetensors")
    fresh = prune.load(tmp_path / "model.safetensors", Classifier(seed=5))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert size < sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture(scope="module")
def mid_pruning(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint after 2 of the 3 AGP epochs: sparsity 0.7 of the 0.8 target."""
    tmp_path = tmp_path_factory.mktemp("half")
    model, pruning = Classifier(), agp()
    fit = trainer(tmp_path, 2, [pruning, GradientClipping(clip.AutoClip())])
    fit.fit(model, loader())
    assert pruning.pruner.current_sparsity == pytest.approx(0.7, abs=1e-3)
    fit.save_checkpoint(tmp_path / "half.ckpt")
    return tmp_path / "half.ckpt", {k: v.clone() for k, v in pruning.pruner.masks.items()}


def test_checkpoint_carries_masks_schedule_and_clip_state(mid_pruning: tuple) -> None:
    path, masks = mid_pruning
    states = torch.load(path, weights_only=False)["callbacks"]
    pruning, clipping = states["Pruning"], states["GradientClipping"]
    assert pruning["schedule"]["tick"] == 2
    for name, mask in masks.items():
        assert torch.equal(pruning["pruner"]["masks"][name], mask)
    assert clipping["rule"] and clipping["log"]  # AutoClip's history of norms, and the log


def test_resuming_mid_pruning_keeps_the_masks_and_finishes_the_schedule(mid_pruning: tuple, tmp_path: Path) -> None:
    path, saved = mid_pruning
    model, pruning, clipping = Classifier(seed=3), agp(), GradientClipping(clip.AutoClip())
    probe = GradProbe(pruning)
    trainer(tmp_path, 4, [pruning, clipping, probe]).fit(model, loader(), ckpt_path=path)
    for name, mask in saved.items():
        assert torch.equal(probe.masks_at_start[name], mask), name
        assert not (pruning.pruner.masks[name] & ~mask).any(), name  # pruned weights stay pruned
    assert pruning.pruner.current_sparsity == pytest.approx(0.8, abs=1e-3)
    assert pruning.schedule.tick == 3 and all(probe.pruned_grads_zero)
    assert clipping.clip_log.total_steps == 4 * STEPS_PER_EPOCH  # the log went on from the checkpoint


def test_module_loaded_from_the_checkpoint_has_the_zeros_of_its_masks(mid_pruning: tuple) -> None:
    path, saved = mid_pruning
    params = dict(Classifier.load_from_checkpoint(path).named_parameters())
    for name, mask in saved.items():
        assert torch.all(params[name][~mask] == 0), name


def test_data_criterion_scores_training_batches_and_prunes(tmp_path: Path) -> None:
    model = Classifier()
    pruning = Pruning(0.6, criterion="taylor", loss_fn=F.cross_entropy, score_batches=2)
    trainer(tmp_path, 1, [pruning]).fit(model, loader())
    assert pruning.pruner.current_sparsity == pytest.approx(0.6, abs=1 / 384)  # 384 weights


def test_data_criterion_without_loss_fn_is_refused() -> None:
    with pytest.raises(SecateursError, match="loss_fn: got None; allowed: a callable"):
        Pruning(0.5, criterion="gradient")


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(SecateursError, match="schedule: got 'cosine'; allowed: oneshot, iterative, agp"):
        Pruning(0.5, schedule="cosine")


def test_gradient_clipping_and_trainer_gradient_clip_val_are_exclusive(tmp_path: Path) -> None:
    fit = trainer(tmp_path, 1, [GradientClipping(clip.GlobalNorm(1.0))], gradient_clip_val=1.0)
    with pytest.raises(SecateursError, match=r"gradient_clip_val: got 1\.0"):
        fit.fit(Classifier(), loader())


def test_gradient_clipping_takes_a_rule_or_a_method_name() -> None:
    assert isinstance(GradientClipping("zclip").rule, clip.ZClip)
    with pytest.raises(SecateursError, match=r"^max_norm: got None; allowed: a value: required"):
        GradientClipping("global_norm")
    with pytest.raises(SecateursError, match=r"^rule: got 'clipnorm'; allowed: value, norm, "):
        GradientClipping("clipnorm")
    with pytest.raises(SecateursError, match="params: got"):
        GradientClipping(clip.GlobalNorm(1.0), max_norm=2.0)


class RankRecord(pl.Callback):
    """Writes each rank's masks and clip norms to ``out`` (ddp_spawn returns nothing else)."""

    def __init__(self, pruning: Pruning, clipping: GradientClipping, out: Path) -> None:
        self.pruning, self.clipping, self.out = pruning, clipping, out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"masks": self.pruning.pruner.masks, "norms": self.clipping.clip_log.norms()}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_under_ddp_both_ranks_clip_the_same_norms_and_select_the_same_masks(tmp_path: Path) -> None:
    pruning = Pruning(0.8, criterion="gradient", loss_fn=F.cross_entropy, schedule="agp", schedule_options={"end": 1})
    clipping = GradientClipping("global_norm", max_norm=0.5)
    fit = pl.Trainer(
        max_epochs=2, strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False,
        callbacks=[pruning, clipping, RankRecord(pruning, clipping, tmp_path)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    fit.fit(Classifier(), loader())
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(first["norms"]) == 2 * STEPS_PER_EPOCH // 2  # each rank steps on half of each epoch
    assert first["norms"] == second["norms"]
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
    assert 1 - sum(int(m.sum()) for m in first["masks"].values()) / 384 == pytest.approx(0.8, abs=1 / 384)
