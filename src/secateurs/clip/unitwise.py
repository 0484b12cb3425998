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

from secateurs.clip._tensors import is_dtensor, shape_groups
from secateurs.errors import SecateursError


def _unit_norms(stacked: Tensor, unit_ndim: int) -> Tensor:
    """Unit norms of a ``[k, *shape]`` stack, flattened to ``k * units`` values."""
    if unit_ndim > 1:
        return torch.linalg.vector_norm(stacked.flatten(2), dim=2).flatten()
    return torch.linalg.vector_norm(stacked.flatten(1), dim=1)


def _stack(tensors: list[Tensor], index: list[int]) -> Tensor:
    if len(index) == 1:
        return tensors[index[0]].unsqueeze(0)
    return torch.stack([tensors[i] for i in index])


def _check_plain(grads: list[Tensor]) -> None:
    if any(is_dtensor(g) for g in grads):
        raise SecateursError(
            "agc: got DTensor gradients; allowed: ordinary tensors (unit-wise norms need "
            "whole rows; use GlobalNorm, AutoClip or ZClip for sharded models)"
        )


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
    _check_plain(grads)
    groups = shape_groups(grads)
    first = grads[0].device
    g_parts: list[Tensor] = []
    w_parts: list[Tensor] = []
    for index in groups:
        # weights and gradients of one group back to back, so the scaling pass below (run in
        # reverse) finds the most recent ones still in cache
        ndim = grads[index[0]].dim()
        w_parts.append(_unit_norms(_stack(params, index), ndim).to(first))
        g_parts.append(_unit_norms(_stack(grads, index), ndim).to(first))
    g_units = torch.cat(g_parts)
    w_units = torch.cat(w_parts)
    bound = torch.clamp(w_units, min=eps) * clipping
    factor = torch.where(g_units < bound, 1.0, bound / torch.clamp(g_units, min=1e-6))

    targets: list[Tensor] = []
    factors: list[Tensor] = []
    for index, f in zip(groups, torch.split(factor, [p.numel() for p in g_parts]), strict=True):
        shape = grads[index[0]].shape
        # [k, units, 1, ...] (or [k, 1] / [k] for 1-D / 0-d) so each slice broadcasts
        lead = (len(index), shape[0]) if len(shape) > 1 else (len(index),)
        trailing = [1] * (len(shape) - 1 if len(shape) > 1 else len(shape))
        targets.extend(grads[i] for i in index)
        factors.extend(f.view(*lead, *trailing).unbind(0))
    _mul_(targets[::-1], factors[::-1])

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
