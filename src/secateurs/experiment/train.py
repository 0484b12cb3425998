"""The training loop's parts: the clipped optimizer, one epoch of optimisation, evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from secateurs import clip
from secateurs.experiment.config import TrainConfig
from secateurs.experiment.data import Split, batches

Batch = tuple[torch.Tensor, torch.Tensor]


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The torch.optim optimizer a config names."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(name)


def clipped_optimizer(
    cfg: TrainConfig, params: Iterable[nn.Parameter], *, lr: float, rule: clip.Rule | None, log: clip.ClipLog
) -> clip.ClippedOptimizer:
    """``cfg``'s optimizer over ``params`` at ``lr``, clipping with ``rule`` and logging into ``log``."""
    inner = make_optimizer(cfg.optimizer, params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return clip.wrap(inner, rule, nonfinite=cfg.nonfinite, log=log)


def rebuilt_optimizer(old: clip.ClippedOptimizer, cfg: TrainConfig, params: Iterable[nn.Parameter]) -> clip.ClippedOptimizer:
    """A new optimizer for new parameters (a model after structured surgery): moments restart,
    while the clip rule, its log and the step count carry on, at ``old``'s learning rate.

    The rule and the log are the same objects, so the rule's state (an AutoClip history, a
    ZClip average) continues as if nothing had happened. Pruner hooks are not carried over.
    """
    new = clipped_optimizer(cfg, params, lr=old.param_groups[0]["lr"], rule=old.rule, log=old.log)
    new.steps = old.steps
    return new


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[Batch],
    *,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One pass over ``data``; returns the mean loss as a tensor (read it once, after the epoch)."""
    model.train()
    total = torch.zeros(())
    count = 0
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        count += 1
        if on_step is not None:
            on_step()
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, *, batch_size: int = 512) -> float:
    """Fraction of ``split`` classified correctly."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    for x, y in batches(split, batch_size):
        correct += (model(x).argmax(dim=1) == y).sum()
    return int(correct) / max(len(split), 1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss every phase trains on (also handed to data-dependent criteria)."""
    return F.cross_entropy(outputs, targets)
