"""How ``secateurs run`` prunes: what a config's ``[prune]`` table builds, and one epoch's tick.

Both kinds of pruning are driven by a schedule from :mod:`secateurs.prune.schedules`:

- ``unstructured``: a :class:`~secateurs.prune.Pruner` on ``prune.schedule`` (oneshot,
  iterative or AGP over ``prune.epochs``);
- ``structured``: :class:`StructuredRounds`, which removes whole channels, on a linear
  iterative schedule of ``prune.rounds`` rounds spread over ``prune.epochs``.

Config values reach the library inside :func:`~secateurs.errors.config_keys`, so a bad value
is reported under its config key (``prune.rounds``), not the library's argument name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from secateurs import prune
from secateurs.errors import check_int, config_keys
from secateurs.experiment.config import PruneConfig
from secateurs.experiment.train import Batch, cross_entropy
from secateurs.prune.schedules import Prunable, Schedule, make_schedule

__all__ = ["StructuredRounds", "make_pruner", "make_schedule_for", "pattern_misfits", "pruning_tick"]

# The schedule options the Run derives from prune.epochs rather than taking from a key of their own.
_SCHEDULE_KEYS = {"finetune_epochs": "prune.epochs", "end": "prune.epochs"}


class StructuredRounds:
    """Structured pruning shaped like a :class:`~secateurs.prune.Pruner`, for a schedule to drive.

    ``step(s)`` replaces :attr:`model` by a physically smaller copy with the fraction ``s`` of
    its original channels removed (:func:`secateurs.prune.structured`; targets are cumulative,
    relative to the original model). The caller then builds a new optimizer for the new
    parameters. Criteria that read data (:attr:`requires_data`) are given their batches with
    :meth:`score` first, as a Pruner's are.

    >>> from torch import nn
    >>> from secateurs.prune.schedules import Iterative
    >>> rounds = StructuredRounds(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4), sparsity=0.5)
    >>> schedule = Iterative(rounds, rounds=2, finetune_epochs=1, spacing="linear")
    >>> while not schedule.done:
    ...     _ = schedule.step()
    >>> rounds.model[0].out_features
    4
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        sparsity: float | None,
        threshold: float | None = None,
        criterion: str = "magnitude",
        scope: str = "layer",
        exclude: tuple[str, ...] = (),
    ):
        self.model = model
        self.example = example
        self.sparsity = sparsity
        """The fraction of channels removed once every round is done (None: below ``threshold``)."""
        self.threshold = threshold
        """Instead of a sparsity: every channel scoring below it is removed, in one step."""
        self.criterion = criterion
        self.scope = scope
        self.exclude = exclude
        self._batches: list[Any] | None = None
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None

    @property
    def requires_data(self) -> bool:
        """Whether the criterion scores channels on batches (taylor, gradient, activation)."""
        return bool(getattr(prune.GROUP_CRITERIA.get(self.criterion), "needs_data", False))

    def score(self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> int:
        """Keep ``batches`` (and ``loss_fn``) for the next :meth:`step`; returns how many."""
        self._batches = list(batches)
        self._loss_fn = loss_fn
        return len(self._batches)

    def step(self, sparsity: float | None) -> float:
        """Remove channels until ``sparsity`` of the original ones are gone (``None``: those
        scoring below the threshold); returns the fraction of the original channels removed."""
        goal = {"sparsity": sparsity} if sparsity is not None else {"threshold": self.threshold}
        self.model = prune.structured(
            self.model, self.example, **goal, criterion=self.criterion, scope=self.scope,
            exclude=self.exclude, batches=self._batches, loss_fn=self._loss_fn,
        )
        self._batches = self._loss_fn = None
        record = prune.pruning_record(self.model)
        return float(record["sparsity"]) if record else 0.0


def make_pruner(cfg: PruneConfig, model: nn.Module) -> prune.Pruner:
    """The unstructured :class:`~secateurs.prune.Pruner` of ``cfg`` over ``model``.

    Data-free random criteria draw their seed from torch's RNG here.
    """
    with config_keys("prune."):
        return prune.Pruner(
            model,
            sparsity=cfg.sparsity if cfg.threshold is None else None,
            threshold=cfg.threshold,
            criterion=cfg.criterion,
            scope=cfg.scope,
            exclude=tuple(cfg.exclude),
            per_layer=dict(cfg.per_layer) or None,
            pattern=cfg.pattern or None,
        )


def pattern_misfits(pruner: prune.Pruner) -> dict[str, int]:
    """The targeted weights that cannot follow the pruner's N:M pattern, with the length of the
    dimension its blocks run along (the input dimension) when that is not a multiple of M: a
    first convolution with one input channel, say, keeps every weight the pattern would cut."""
    if pruner.pattern is None:
        return {}
    _, m = pruner.pattern
    misfits = {}
    for target in pruner.targets:
        shape = target.shape
        along = shape[1] if len(shape) > 1 else shape[0]
        if along % m:
            misfits[target.name] = along
    return misfits


def make_schedule_for(cfg: PruneConfig, target: Prunable) -> Schedule:
    """The schedule of ``cfg`` driving ``target``, one tick per prune-phase epoch.

    Iterative rounds (and structured rounds) are ``prune.epochs // prune.rounds`` epochs apart
    (at least one); AGP ramps from the first prune epoch to the last.
    """
    with config_keys("prune.", names=_SCHEDULE_KEYS):
        if cfg.threshold is not None:  # below a threshold: one prune, at the first prune epoch
            return make_schedule("oneshot", target)
        if cfg.kind == "structured" or cfg.schedule == "iterative":
            every = max(cfg.epochs // check_int(cfg.rounds, "rounds", minimum=1), 1)
            options: dict[str, Any] = {"rounds": cfg.rounds, "finetune_epochs": every}
            if cfg.kind == "structured":
                return make_schedule("iterative", target, **options, spacing="linear")
            return make_schedule("iterative", target, **options)
        if cfg.schedule == "agp":
            return make_schedule("agp", target, start=0, end=max(cfg.epochs - 1, 0), frequency=1)
        return make_schedule(cfg.schedule, target)


def pruning_tick(schedule: Schedule, scoring_batches: Callable[[], Iterable[Batch]]) -> bool:
    """One tick of ``schedule``: if it prunes now with a criterion that reads data, score on
    ``scoring_batches()`` first; returns whether it pruned."""
    target = schedule.pruner
    if schedule.prunes_next() and getattr(target, "requires_data", False):
        target.score(scoring_batches(), cross_entropy)  # type: ignore[attr-defined]
    return schedule.step()
