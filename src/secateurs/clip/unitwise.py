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
a handful of kernels, not one per tensor; large tensors are reduced where they lie. Units never
span tensors, so clipping proceeds chunk by chunk and each gradient is scaled while still in
cache from its norm pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.clip._tensors import is_dtensor, shape_groups
from secateurs.errors import SecateursError

# elements per chunk (16 MB of float32 gradients): few enough to stay in a server L3 cache
CHUNK_NUMEL = 1 << 22
# units per slice of per-unit arithmetic: under ATen's grain size (32768), so it runs serially
SLICE_UNITS = 1 << 14


def _unit_norms(stacked: Tensor, unit_ndim: int) -> Tensor:
    """Unit norms of a ``[k, *shape]`` stack, flattened to ``k * units`` values."""
    if unit_ndim > 1:
        return torch.linalg.vector_norm(stacked.flatten(2), dim=2).flatten()
    return torch.linalg.vector_norm(stacked.flatten(1), dim=1)


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


def _chunks(groups: list[list[int]], tensors: list[Tensor]) -> list[list[list[int]]]:
    """Consecutive groups on one device holding at most ``CHUNK_NUMEL`` elements together."""
    chunks: list[list[list[int]]] = []
    size = 0
    device = None
    for index in groups:
        t = tensors[index[0]]
        n = t.numel() * len(index)
        if not chunks or size + n > CHUNK_NUMEL or t.device != device:
            chunks.append([])
            size = 0
            device = t.device
        chunks[-1].append(index)
        size += n
    return chunks


def _units(t: Tensor) -> int:
    return t.shape[0] if t.dim() > 1 else 1


def _factors(
    g_units: Tensor, w_units: Tensor, clipping: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit factors, plus the squared sums (g, g * factor, bound) and "any clipped".

    Runs over slices of at most ``SLICE_UNITS`` units so each small kernel stays under ATen's
    grain size and runs serially: on a busy machine every parallel kernel can wait for its
    second thread to be scheduled, which would cost more than the arithmetic.
    """
    factor = torch.empty_like(g_units)
    sums: list[Tensor] = []
    clipped: list[Tensor] = []
    for lo in range(0, g_units.numel(), SLICE_UNITS):
        g = g_units[lo : lo + SLICE_UNITS]
        bound = w_units[lo : lo + SLICE_UNITS].clamp(min=eps).mul_(clipping)
        f = factor[lo : lo + SLICE_UNITS]
        torch.div(bound, g.clamp(min=1e-6), out=f)
        f.masked_fill_(g < bound, 1.0)
        sums.append(torch.stack([g.square().sum(), (g * f).square().sum(), bound.square().sum()]))
        clipped.append((f < 1.0).any())
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum(dim=0)
    return factor, total, torch.stack(clipped).any()


@torch.no_grad()
def agc_apply_(params: list[Tensor], grads: list[Tensor], clipping: float, eps: float) -> AGCResult:
    """Clip ``grads`` (the gradients of ``params``, same order) unit-wise, in place.

    Units never span tensors, so the work goes chunk by chunk (a few MB of gradients at a time):
    reduce the chunk's weights and gradients, then scale its gradients while they are still in
    cache. Memory traffic is one read of the weights and one read and write of the gradients.
    """
    _check_plain(grads)
    first = grads[0].device
    sums: list[Tensor] = []  # squared sums of g, g * factor, bound, per piece
    clipped: list[Tensor] = []
    for chunk in _chunks(shape_groups(grads), grads):
        g_parts = []
        w_parts = []
        for index in chunk:
            ndim = grads[index[0]].dim()
            if len(index) == 1:  # one tensor: reduce it where it lies
                w_parts.append(_unit_norms(params[index[0]].unsqueeze(0), ndim))
                g_parts.append(_unit_norms(grads[index[0]].unsqueeze(0), ndim))
            else:  # small tensors: gradients and weights in one stack, one reduction
                both = torch.stack([grads[i] for i in index] + [params[i] for i in index])
                g, w = _unit_norms(both, ndim).chunk(2)
                g_parts.append(g)
                w_parts.append(w)
        # per-unit arithmetic: the chunk's units together when few (one set of small serial
        # kernels), part by part when many (no parallel cat of a long vector)
        if len(g_parts) > 1 and sum(g.numel() for g in g_parts) <= SLICE_UNITS:
            g_parts, w_parts = [torch.cat(g_parts)], [torch.cat(w_parts)]
        pieces: list[Tensor] = []
        for g, w in zip(g_parts, w_parts, strict=True):
            factor, part_sums, part_clipped = _factors(g, w, clipping, eps)
            pieces.append(factor)
            sums.append(part_sums.float().to(first))
            clipped.append(part_clipped.to(first))
        if len(pieces) < len(chunk):
            pieces = list(pieces[0].split([len(i) * _units(grads[i[0]]) for i in chunk]))

        targets: list[Tensor] = []
        factors: list[Tensor] = []
        for index, f in zip(chunk, pieces, strict=True):
            shape = grads[index[0]].shape
            # [k, units, 1, ...] (or [k, 1] / [k] for 1-D / 0-d) so each slice broadcasts
            lead = (len(index), shape[0]) if len(shape) > 1 else (len(index),)
            trailing = [1] * (len(shape) - 1 if len(shape) > 1 else len(shape))
            targets.extend(grads[i] for i in index)
            factors.extend(f.view(*lead, *trailing).unbind(0))
        if grads[chunk[0][0]].device.type in ("cpu", "cuda"):
            torch._foreach_mul_(targets, factors)
        else:
            for t, f in zip(targets, factors, strict=True):
                t.mul_(f)

    norms = torch.stack(sums).sum(dim=0).sqrt()
    return AGCResult(
        grad_norm=norms[0],
        clipped_norm=norms[1],
        threshold=norms[2],
        clipped=torch.stack(clipped).any(),
    )
