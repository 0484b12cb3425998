"""The training loop's parts: the device, the clipped optimizer, one epoch of optimisation, evaluation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from secateurs import clip
from secateurs.errors import SecateursError
from secateurs.experiment.config import TrainConfig, check_device_name
from secateurs.experiment.data import Split, batches

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_device(value: str, *, cuda_count: int, mps: bool, local_rank: int = 0) -> torch.device:
    """The device ``train.device = value`` names on a machine with ``cuda_count`` CUDA GPUs and
    (``mps``) an Apple GPU or not; the availability is passed in, so any machine can be described.

    ``auto`` takes a GPU when there is one: CUDA first, then MPS, else the CPU. A bare ``cuda``
    (or ``auto`` on a CUDA machine) is GPU ``local_rank``: under ``torchrun`` each process on a
    node takes its own (``LOCAL_RANK``), as the process group does. Anything the machine lacks
    is a :class:`SecateursError` naming ``train.device``, the value and what is allowed here.

    >>> resolve_device("auto", cuda_count=2, mps=False, local_rank=1), resolve_device("auto", cuda_count=0, mps=False)
    (device(type='cuda', index=1), device(type='cpu'))
    """
    try:
        check_device_name(value)
    except ValueError as exc:
        raise SecateursError(f"train.device: got {value!r}; {exc}") from None
    gpus = "cuda:0" if cuda_count == 1 else f"cuda:0 to cuda:{cuda_count - 1}"
    here = ["auto", "cpu"] + ([f"cuda, {gpus}"] if cuda_count else []) + (["mps"] if mps else [])
    allowed = f"allowed on this machine: {', '.join(here)}"
    given_value = value
    if value == "auto":
        if not cuda_count:
            return torch.device("mps" if mps else "cpu")
        value = "cuda"
    if value == "cpu":
        return torch.device("cpu")
    if value == "mps":
        if not mps:
            raise SecateursError(f"train.device: got 'mps', but this machine has no MPS device (torch.backends.mps.is_available() is False); {allowed}")
        return torch.device("mps")
    # cuda or cuda:N
    if not cuda_count:
        raise SecateursError(f"train.device: got {value!r}, but this machine has no CUDA device (torch.cuda.is_available() is False); {allowed}")
    _, _, given = value.partition(":")
    index = int(given) if given else local_rank
    if index >= cuda_count:
        which = f"GPU {index}" if given else f"GPU {index} (LOCAL_RANK {local_rank}: one GPU per process)"
        raise SecateursError(f"train.device: got {given_value!r}, which is {which}, but this machine has {cuda_count} CUDA device(s); {allowed}")
    return torch.device("cuda", index)


def run_device(value: str) -> torch.device:
    """:func:`resolve_device` for this machine (``LOCAL_RANK`` from the environment, as torchrun sets it)."""
    mps = getattr(torch.backends, "mps", None)
    return resolve_device(
        value,
        cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        mps=bool(mps is not None and mps.is_available()),
        local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
    )


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (else its buffers) live; the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A batch of inputs and labels on ``device`` (the same tensors when already there)."""
    x, y = batch
    return x.to(device), y.to(device)


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
    """One pass over ``data``; returns the mean loss as a tensor on the model's device (read it
    once, after the epoch). Each batch is moved to that device before its forward pass."""
    model.train()
    device = device_of(model)
    total = torch.zeros((), device=device)
    count = 0
    for batch in data:
        x, y = to_device(batch, device)
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
    """Fraction of ``split`` classified correctly, counted on the model's device (read once)."""
    model.eval()
    device = device_of(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches(split, batch_size):
        x, y = to_device(batch, device)
        correct += (model(x).argmax(dim=1) == y).sum()
    return int(correct) / max(len(split), 1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss every phase trains on (also handed to data-dependent criteria)."""
    return F.cross_entropy(outputs, targets)
