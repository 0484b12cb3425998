"""Unit-wise norms and the adaptive gradient clipping (AGC) factors of Brock et al. 2021.

A *unit* is one output unit of a layer: one row of a Linear or RNN weight (``[out, in]``), one
output channel of a Conv weight (``[out, in, *kernel]``), one embedding vector. So for a
parameter with ``ndim > 1`` the unit norms are taken over every dimension but the first.
Parameters with ``ndim <= 1`` (biases, normalisation gains, scalars) are one unit each, as in
the reference implementations (NFNets' ``unitwise_norm``, optax ``adaptive_grad_clip``).

For each unit, with ``W`` its weights and ``G`` its gradient::

    max_u = clipping * max(||W||, eps)
    G    <- G                              if ||G|| < max_u
    G    <- G * max_u / max(||G||, 1e-6)   otherwise

Small tensors of the same shape are stacked so a model with thousands of small parameters costs
a handful of kernels, not one per tensor; large tensors are reduced where they lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.clip._tensors import SMALL_NUMEL, is_dtensor
from secateurs.errors import SecateursError


def _unit_norms(stacked: Tensor, unit_ndim: int) -> Tensor:
    """Unit norms of a ``[k, *shape]`` stack as ``[k, units]``."""
    if unit_ndim > 1:
        return torch.linalg.vector_norm(stacked.flatten(2), dim=2)
    return torch.linalg.vector_norm(stacked.flatten(1), dim=1, keepdim=True)


@dataclass
class _Group:
    """Tensors that share one norm kernel: a stack of equal small shapes, or one tensor."""

    index: list[int]
    shape: torch.Size

    @property
    def units(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1


def _plan(grads: list[Tensor]) -> list[_Group]:
    small: dict[tuple[torch.Size, torch.device, torch.dtype], list[int]] = {}
    groups: list[_Group] = []
    for i, g in enumerate(grads):
        if is_dtensor(g):
            raise SecateursError(
                "agc: got DTensor gradients; allowed: ordinary tensors (unit-wise norms need "
                "whole rows; use GlobalNorm, AutoClip or ZClip for sharded models)"
            )
        if g.numel() <= SMALL_NUMEL:
            small.setdefault((g.shape, g.device, g.dtype), []).append(i)
        else:
            groups.append(_Group([i], g.shape))
    groups.extend(_Group(idx, key[0]) for key, idx in small.items())
    return groups


def _group_norms(tensors: list[Tensor], group: _Group) -> Tensor:
    if len(group.index) == 1:
        stacked = tensors[group.index[0]].unsqueeze(0)
    else:
        stacked = torch.stack([tensors[i] for i in group.index])
    return _unit_norms(stacked, len(group.shape)).flatten()


@dataclass
class AGCResult:
    """What one AGC pass computed; every field is a tensor on the gradients' device."""

    grad_norm: Tensor
    """Total 2-norm of the gradients before clipping."""
    clipped_norm: Tensor
    """Total 2-norm of the gradients after clipping."""
    threshold: Tensor
    """2-norm of the per-unit bounds ``max_u`` (the global analogue of the threshold)."""
    clipped: Tensor
    """True when at least one unit was scaled down."""


@torch.no_grad()
def agc_apply_(params: list[Tensor], grads: list[Tensor], clipping: float, eps: float) -> AGCResult:
    """Clip ``grads`` (the gradients of ``params``, same order) unit-wise, in place."""
    plan = _plan(grads)
    first = grads[0].device
    weights = [p.detach() for p in params]
    g_units = torch.cat([_group_norms(grads, grp).to(first) for grp in plan])
    w_units = torch.cat([_group_norms(weights, grp).to(first) for grp in plan])
    bound = torch.clamp(w_units, min=eps) * clipping
    factor = torch.where(g_units < bound, 1.0, bound / torch.clamp(g_units, min=1e-6))

    targets: list[Tensor] = []
    factors: list[Tensor] = []
    sizes = [len(grp.index) * grp.units for grp in plan]
    for grp, f in zip(plan, torch.split(factor, sizes), strict=True):
        # factor shaped [k, units, 1, ...] so each slice broadcasts over its tensor
        trailing = len(grp.shape) - 1 if len(grp.shape) > 1 else len(grp.shape)
        lead = (len(grp.index), grp.units) if len(grp.shape) > 1 else (len(grp.index),)
        views = f.view(*lead, *([1] * trailing)).unbind(0)
        targets.extend(grads[i] for i in grp.index)
        factors.extend(views)
    _mul_(targets, factors)

    return AGCResult(
        grad_norm=torch.linalg.vector_norm(g_units),
        clipped_norm=torch.linalg.vector_norm(g_units * factor),
        threshold=torch.linalg.vector_norm(bound),
        clipped=(factor < 1.0).any(),
    )


def _mul_(tensors: list[Tensor], factors: list[Tensor]) -> None:
    by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    for t, f in zip(tensors, factors, strict=True):
        ts, fs = by_device.setdefault(t.device, ([], []))
        ts.append(t)
        fs.append(f if f.device == t.device else f.to(t.device))
    for device, (ts, fs) in by_device.items():
        if device.type in ("cpu", "cuda"):
            torch._foreach_mul_(ts, fs)
        else:
            for t, f in zip(ts, fs, strict=True):
                t.mul_(f)
