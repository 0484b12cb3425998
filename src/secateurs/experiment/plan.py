"""The epoch plan of ``secateurs run``: the phases, and each epoch's learning rate and seed.

A run is ``train.epochs`` of dense training, then (unless ``prune.kind = "none"``)
``prune.epochs`` while the schedule prunes and ``prune.finetune_epochs`` of fine-tuning; phases
of zero epochs are left out. Epochs are counted over all phases, from 0.

>>> from secateurs.experiment.config import load_config
>>> plan = EpochPlan.from_config(load_config(overrides=["train.epochs=2", "prune.epochs=1", "prune.finetune_epochs=2"]))
>>> [p.name for p in plan.phases], plan.total, plan.phase_at(3)
(['dense', 'prune', 'finetune'], 5, (Phase(name='finetune', epochs=2), 0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secateurs.experiment.config import RunConfig

__all__ = ["EpochPlan", "Phase"]


@dataclass(frozen=True)
class Phase:
    """One phase of a run: ``dense``, ``prune`` or ``finetune``, and how many epochs it lasts."""

    name: str
    epochs: int


@dataclass(frozen=True)
class EpochPlan:
    """Which phase every epoch of a run is in, at which learning rate, with which seed."""

    phases: tuple[Phase, ...]
    dense_lr: float
    """The peak learning rate of dense training (``train.lr``)."""
    prune_lr: float
    """The learning rate while pruning, and the peak of fine-tuning."""
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EpochPlan:
        """The plan of ``cfg``: dense training, the pruning schedule, then fine-tuning."""
        phases = [Phase("dense", cfg.train.epochs)]
        if cfg.prune.kind != "none":
            phases += [Phase("prune", cfg.prune.epochs), Phase("finetune", cfg.prune.finetune_epochs)]
        return cls(
            phases=tuple(p for p in phases if p.epochs > 0),
            dense_lr=cfg.train.lr,
            prune_lr=cfg.prune.lr or cfg.train.lr / 3,
            seed=cfg.seed,
        )

    @property
    def total(self) -> int:
        """Epochs over all phases."""
        return sum(p.epochs for p in self.phases)

    def phase_at(self, epoch: int) -> tuple[Phase, int]:
        """The phase ``epoch`` falls in, and the epoch's index within that phase."""
        start = 0
        for phase in self.phases:
            if epoch < start + phase.epochs:
                return phase, epoch - start
            start += phase.epochs
        raise IndexError(epoch)

    def lr_at(self, epoch: int) -> float:
        """Cosine decay within dense training and fine-tuning; constant while the schedule prunes."""
        phase, local = self.phase_at(epoch)
        base = self.dense_lr if phase.name == "dense" else self.prune_lr
        if phase.name == "prune":
            return base
        return base * 0.5 * (1 + math.cos(math.pi * local / phase.epochs))

    def seed_at(self, epoch: int) -> int:
        """The seed of ``epoch``: its batch order, augmentation, scoring batches and torch's RNG."""
        return self.seed * 1_000_003 + epoch
