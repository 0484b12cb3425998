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

The layout of that work (groups, chunks, stacking buffers, the per-tensor views of the factor
buffer) depends only on the gradients' shapes, dtypes and devices, so it is a :class:`UnitPlan`
that the :class:`~secateurs.clip.AGC` rule builds once and reuses while the layout stays the
same; on a model with thousands of small tensors that saves most of the per-tensor overhead.
"""

from __future__ import annotations

import importlib
import math
import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from secateurs.clip._tensors import has_dtensor, local, plain, shape_groups
from secateurs.errors import check

if TYPE_CHECKING:
    from secateurs.clip._agc_fused import FusedSegment

# elements per chunk on the CPU (2 MB of float32 gradients): the chunk's gradients, and the
# one scratch buffer its small tensors are stacked into, are still in cache when they are
# scaled, right after their norms were taken (on the benchmark's 2000 small tensors, paired
# runs had 4 MB chunks about 5% and 1 MB chunks about 2% slower)
CHUNK_NUMEL = 1 << 19
# units per slice of per-unit arithmetic on the CPU: under ATen's grain size (32768), so it
# runs serially (on a busy machine a parallel kernel can wait for its second thread longer
# than the arithmetic takes)
SLICE_UNITS = 1 << 14


# the kernel accumulates in float32, so float64 keeps the per-tensor path
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED: list[ModuleType | None] = []  # the Triton module once imported, or None if it cannot be


# the fused kernel's host cost grows with the tensors (their addresses are checked every step,
# ~0.1 us each), the per-tensor path's with the groups (three launches, ~5 us each): on CUDA it
# is fused unless most tensors are small ones stacked by shape (2000 small tensors in 2 shapes
# take the stacked path; ResNet-50's 62 tensors in 54 groups, or any model of large weights,
# the kernel)
FUSED_MAX_TENSORS_PER_GROUP = 8


def _fused_pays(groups: list[list[int]]) -> bool:
    return sum(map(len, groups)) <= FUSED_MAX_TENSORS_PER_GROUP * len(groups)


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fused_module(required: bool) -> ModuleType | None:
    """:mod:`secateurs.clip._agc_fused` (needs Triton), or None where Triton is missing."""
    if not _FUSED:
        try:
            _FUSED.append(importlib.import_module("secateurs.clip._agc_fused"))
        except Exception as exc:  # ImportError, or a Triton that cannot start
            if not isinstance(exc, ImportError):
                warnings.warn(f"agc: Triton is unusable ({exc}); AGC takes the per-tensor path",
                              RuntimeWarning, stacklevel=4)  # fmt: skip
            _FUSED.append(None)
    if required and _FUSED[0] is None:
        check(False, "fused", True, "False or None (fused=True needs Triton, which is not installed)")
    return _FUSED[0]


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


def _agc_dtensor_(params: list[Tensor], grads: list[Tensor], clipping: float, eps: float) -> AGCResult:
    """AGC on DTensors (FSDP2 shards), tensor by tensor in DTensor ops.

    Every reduction is a DTensor reduction, so a unit's norm is whole whatever the placement:
    with a weight sharded along dim 0 (``fully_shard``) its rows, the units, are local to their
    shard and cost no communication; a sharded bias is one unit whose norm DTensor reduces over
    the shards. Only the four statistics are gathered, one all-reduce each per tensor.
    """
    norm = torch.linalg.vector_norm
    parts: list[list[Tensor]] = [[], [], [], []]  # squared norms before, after, of bounds; clipped
    for w, g in zip(params, grads, strict=True):
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        gn = norm(g, dim=dims, keepdim=True) if dims else norm(g)
        wn = norm(w.detach(), dim=dims, keepdim=True) if dims else norm(w.detach())
        bound = torch.clamp(wn, min=eps) * clipping
        factor = torch.where(gn < bound, torch.ones_like(gn), bound / torch.clamp(gn, min=1e-6))
        g.mul_(factor)
        for out, value in zip(parts, ((gn.float() ** 2).sum(), ((gn * factor).float() ** 2).sum(),
                                      (bound.float() ** 2).sum(), (factor < 1.0).any()), strict=True):  # fmt: skip
            out.append(plain(value).to(grads[0].device))
    sq_before, sq_after, sq_bound, clipped = (torch.stack(p) for p in parts)
    local_device = local(grads[:1])[0].device
    return AGCResult(
        grad_norm=sq_before.sum().sqrt().to(local_device),
        clipped_norm=sq_after.sum().sqrt().to(local_device),
        threshold=sq_bound.sum().sqrt().to(local_device),
        clipped=clipped.any().to(local_device),
    )


def _units(t: Tensor) -> int:
    return t.shape[0] if t.dim() > 1 else 1


def _pieces(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into consecutive ranges of at most ``step``."""
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _taker(index: Sequence[int]) -> operator.itemgetter:
    """``f(xs)`` picking ``xs[i]`` for ``i`` in ``index``, as a sequence even for one index."""
    if len(index) == 1:
        return operator.itemgetter(slice(index[0], index[0] + 1))
    return operator.itemgetter(*index)


@dataclass(frozen=True)
class _Group:
    """Tensors of one shape handled together: stacked when small, else one large tensor."""

    take: operator.itemgetter
    """Picks the group's tensors out of the gradient (or parameter) list."""
    g_out: Tensor
    """Where the group's gradient unit norms go (a view of its segment's buffer)."""
    w_out: Tensor
    """Where the group's weight unit norms go."""
    dims: tuple[int, ...] | None
    """Dimensions a lone tensor's unit norms reduce (None: all, one unit)."""
    g_stack: Tensor | None = None
    """Buffer ``[k, *shape]`` the group's gradients are stacked into; None for a lone tensor,
    which is reduced where it lies (whatever its memory format)."""
    w_stack: Tensor | None = None
    """The same for the weights. On the CPU both are views of one scratch buffer that every
    group of the segment shares: a stack is needed only until it is reduced, and one buffer of
    a chunk's size stays in cache where a buffer per group would not."""
    g_rows: Tensor | None = None
    """``g_stack`` as ``[units, elements per unit]``."""
    w_rows: Tensor | None = None


@dataclass(frozen=True)
class _Chunk:
    """Consecutive groups of one segment, a few MB together on the CPU (``CHUNK_NUMEL``)."""

    groups: tuple[_Group, ...]
    slices: tuple[tuple[Tensor, Tensor, Tensor], ...]
    """Views (gradient norms, bounds, factors) of the chunk's units, in ``SLICE_UNITS`` pieces."""
    take: operator.itemgetter | None
    """Picks the gradients scaled one by one, in the order of ``views`` (None: there are none)."""
    views: list[Tensor]
    """One view of the factors per such gradient, shaped to broadcast against it."""
    restack: tuple[tuple[_Group, Tensor, list[Tensor]], ...] = ()
    """Off the CPU, stacked groups are scaled in their stack and copied back in one foreach
    kernel (a per-tensor multiply would launch a kernel per tensor): each with the factors
    shaped against the stack and the stack's gradient slices."""


@dataclass(frozen=True)
class _Segment:
    """All tensors of one device and dtype: per-unit buffers and the chunks that fill them."""

    buffers: Tensor
    """``[4, units]``: gradient unit norms, weight unit norms, bounds, factors."""
    chunks: list[_Chunk]
    slices: tuple[tuple[Tensor, Tensor], ...]
    """Views (weight norms, bounds) of all units, in ``SLICE_UNITS`` pieces."""


def _layout(t: Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return t.shape, t.dtype, t.device


class UnitPlan:
    """How AGC walks a list of gradients: segments, chunks, groups, buffers and views.

    Built from the gradients' layout (shapes, dtypes, devices), so it serves any gradients (and
    parameters) of that layout and a rule can reuse it every step (see :meth:`fits`). It holds
    a stacking buffer per group of small tensors (twice their size: gradients and weights) and
    four values per unit (the norms, the bound and the factor).
    """

    def __init__(
        self, grads: list[Tensor], params: Sequence[Tensor] = (), *, fused: bool | None = None
    ) -> None:
        """``fused`` (as in torch's optimizers): None (default) runs each CUDA device and
        dtype as one Triton kernel (:mod:`~secateurs.clip._agc_fused`) when Triton is installed
        and the tensors are not mostly small ones of a few shapes (see
        ``FUSED_MAX_TENSORS_PER_GROUP``); True always does on CUDA (and raises without Triton),
        and on the CPU too under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
        False never does. Float64 tensors take the per-tensor path (the kernel accumulates in
        float32)."""
        self.ids = tuple(map(id, params))
        segments: dict[tuple[torch.device, torch.dtype], list[list[int]]] = {}
        # on the CPU a stack of many small tensors is cut to chunk size too, so each piece is
        # reduced and scaled while in cache
        for index in shape_groups(grads, cpu_numel=CHUNK_NUMEL):
            t = grads[index[0]]
            segments.setdefault((t.device, t.dtype), []).append(index)
        self.leads = [(g[0], _layout(grads[g[0]])) for groups in segments.values() for g in groups]
        self._groups = list(segments.values())
        self._eager: dict[int, _Segment] = {}
        # buffers made outside inference mode can be written in and out of it
        with torch.inference_mode(False):
            self.segments: list[_Segment | FusedSegment] = []
            for k, ((device, dtype), groups) in enumerate(segments.items()):
                # compiled on CUDA, or interpreted on CPU tensors (the interpreter would read
                # a GPU's addresses on the host)
                runs = device.type == ("cpu" if _interpreting() else "cuda")
                by_default = device.type == "cuda" and _fused_pays(groups)
                wanted = (
                    runs and dtype in _FUSED_DTYPES and (fused or (fused is None and by_default))
                )
                module = _fused_module(required=fused is True) if wanted else None
                index = sorted(i for group in groups for i in group)
                if module is not None and module.FusedSegment.supports([grads[i] for i in index]):
                    self.segments.append(module.FusedSegment(index, grads))
                else:
                    self.segments.append(self.eager(k, grads))

    def eager(self, k: int, grads: list[Tensor]) -> _Segment:
        """Segment ``k`` laid out for the per-tensor path (built on first use: a fused segment
        needs it only for a step its kernel cannot take, see ``FusedSegment.apply_``)."""
        if k not in self._eager:
            with torch.inference_mode(False):
                self._eager[k] = self._segment(self._groups[k], grads)
        return self._eager[k]

    def fits(self, params: Sequence[Tensor], grads: list[Tensor]) -> bool:
        """Whether the plan serves ``params`` and their ``grads``: the same parameter objects
        as when it was built, and each group's first tensor still of the same layout.

        That catches a model moved or cast (every tensor changes) and parameters replaced (as
        structured pruning does) without reading every tensor's layout each step; a tensor
        that changed shape in place while keeping its identity, the first of its group left
        alone, makes the stacking raise instead.
        """
        if tuple(map(id, params)) != self.ids:
            return False
        return all(_layout(grads[i]) == layout for i, layout in self.leads)

    @staticmethod
    def _segment(groups: list[list[int]], grads: list[Tensor]) -> _Segment:
        first = grads[groups[0][0]]
        cpu = first.device.type == "cpu"
        units = [len(index) * _units(grads[index[0]]) for index in groups]
        buffers = torch.ones((4, sum(units)), dtype=first.dtype, device=first.device)
        gn, wn, bound, factor = buffers.unbind(0)
        # chunks: consecutive groups of at most CHUNK_NUMEL elements (the CPU only)
        spans: list[list[int]] = []
        size = 0
        for i, index in enumerate(groups):
            n = grads[index[0]].numel() * len(index)
            if not spans or (cpu and size + n > CHUNK_NUMEL):
                spans.append([])
                size = 0
            spans[-1].append(i)
            size += n
        offsets = [0]
        for u in units:
            offsets.append(offsets[-1] + u)

        step = SLICE_UNITS if cpu else max(1, offsets[-1])
        stacked = [len(index) * grads[index[0]].numel() for index in groups if len(index) > 1]
        scratch = None
        if cpu and stacked:
            scratch = torch.empty(max(stacked), dtype=first.dtype, device=first.device)
        chunks = []
        for span in spans:
            built: list[_Group] = []
            views: list[Tensor] = []
            order: list[int] = []
            restack = []
            for i in span:
                index, lo, hi = groups[i], offsets[i], offsets[i + 1]
                t = grads[index[0]]
                group = UnitPlan._group(index, t, gn[lo:hi], wn[lo:hi], scratch)
                built.append(group)
                # [k, units, 1, ...] so each slice broadcasts; [k] (0-d slices) for 1-D / 0-d
                lead = (len(index), t.shape[0]) if t.dim() > 1 else (len(index),)
                trailing = [1] * (t.dim() - 1) if t.dim() > 1 else []
                if group.g_stack is not None and not cpu:  # against the stack [k, *shape]
                    shaped = factor[lo:hi].view(*lead, *[1] * (t.dim() - len(lead) + 1))
                    restack.append((group, shaped, list(group.g_stack.unbind(0))))
                else:
                    views.extend(factor[lo:hi].view(*lead, *trailing).unbind(0))
                    order.extend(index)
            lo, hi = offsets[span[0]], offsets[span[-1] + 1]
            slices = tuple((gn[a:b], bound[a:b], factor[a:b]) for a, b in _pieces(lo, hi, step))
            take = _taker(order) if order else None
            chunks.append(_Chunk(tuple(built), slices, take, views, tuple(restack)))
        bounds = tuple((wn[a:b], bound[a:b]) for a, b in _pieces(0, offsets[-1], step))
        return _Segment(buffers, chunks, bounds)

    @staticmethod
    def _group(
        index: list[int], t: Tensor, g_out: Tensor, w_out: Tensor, scratch: Tensor | None
    ) -> _Group:
        dims = tuple(range(1, t.dim())) if t.dim() > 1 else None
        if len(index) == 1:
            if dims is None:  # one unit: a 0-d view of its slot
                g_out, w_out = g_out.view(()), w_out.view(())
            return _Group(_taker(index), g_out, w_out, dims)
        k = len(index)
        if scratch is None:
            g_stack, w_stack = torch.empty((2, k, *t.shape), dtype=t.dtype, device=t.device)
        else:
            g_stack = w_stack = scratch[: k * t.numel()].view(k, *t.shape)
        rows = k * _units(t), math.prod(t.shape[1:]) if t.dim() > 1 else t.numel()
        stacks = g_stack, w_stack, g_stack.view(rows), w_stack.view(rows)
        return _Group(_taker(index), g_out, w_out, dims, *stacks)


def _factors_(g: Tensor, bound: Tensor, factor: Tensor, exact: bool) -> None:
    """Per-unit factors ``1 if g < bound else bound / max(g, 1e-6)``, into ``factor``.

    When every bound is at least 1e-6 (``exact`` False) that is ``min(1, bound / g)``: two
    kernels instead of four (a unit with ``g < 1e-6`` is then always under its bound).
    """
    if exact:
        torch.clamp(g, min=1e-6, out=factor)
        torch.div(bound, factor, out=factor)
        factor.masked_fill_(g < bound, 1.0)
    else:
        torch.div(bound, g, out=factor).clamp_(max=1.0)


def _clip_segment_(
    segment: _Segment, params: list[Tensor], grads: list[Tensor], clipping: float, eps: float
) -> None:
    """The per-tensor path: unit norms group by group, factors, scaling chunk by chunk."""
    norm = torch.linalg.vector_norm
    exact = clipping * eps < 1e-6
    for chunk in segment.chunks:
        for group in chunk.groups:
            if group.w_stack is None:  # one tensor: reduce it where it lies
                (w,) = group.take(params)
                norm(w, dim=group.dims, out=group.w_out)
            else:  # small tensors: stacked, then reduced together
                torch.stack(group.take(params), out=group.w_stack)
                norm(group.w_rows, dim=1, out=group.w_out)
    for w, bound in segment.slices:
        torch.clamp(w, min=eps, out=bound).mul_(clipping)
    for chunk in segment.chunks:
        for group in chunk.groups:
            if group.g_stack is None:
                (g,) = group.take(grads)
                norm(g, dim=group.dims, out=group.g_out)
            else:
                torch.stack(group.take(grads), out=group.g_stack)
                norm(group.g_rows, dim=1, out=group.g_out)
        for g, bound, factor in chunk.slices:
            _factors_(g, bound, factor, exact)
        if chunk.take is not None:
            targets = chunk.take(grads)
            if targets[0].device.type in ("cpu", "cuda"):
                torch._foreach_mul_(targets, chunk.views)
            else:
                for t, f in zip(targets, chunk.views, strict=True):
                    t.mul_(f)
        for group, factors, stacked in chunk.restack:
            group.g_stack.mul_(factors)
            torch._foreach_copy_(group.take(grads), stacked)


@torch.no_grad()
def agc_apply_(
    params: list[Tensor],
    grads: list[Tensor],
    clipping: float,
    eps: float,
    plan: UnitPlan | None = None,
) -> AGCResult:
    """Clip ``grads`` (the gradients of ``params``, same order) unit-wise, in place.

    First the weights' unit norms and so every unit's bound; then, chunk by chunk (a few MB
    of gradients at a time on the CPU), the gradients' unit norms, their factors, and the
    scaling while those gradients are still in cache. Memory traffic is one read of the
    weights and one read and write of the gradients. ``plan`` is a :class:`UnitPlan` of
    ``grads``' layout to reuse; one is built if None. On CUDA with Triton installed each
    device and dtype is one kernel instead (:mod:`~secateurs.clip._agc_fused`). DTensor
    gradients (FSDP2) take :func:`_agc_dtensor_` and need no plan.
    """
    if has_dtensor(grads):
        return _agc_dtensor_(params, grads, clipping, eps)
    if plan is None:
        plan = UnitPlan(grads)
    filled = []
    for k, segment in enumerate(plan.segments):
        if not isinstance(segment, _Segment) and segment.apply_(params, grads, clipping, eps):
            filled.append(segment.buffers)
            continue
        segment = plan.eager(k, grads)
        _clip_segment_(segment, params, grads, clipping, eps)
        filled.append(segment.buffers)

    norm = torch.linalg.vector_norm
    first = grads[0].device
    parts = []
    clipped = []
    for buffers in filled:
        buffers = buffers.float()
        gn, _, _, factor = buffers.unbind(0)
        both = norm(buffers, dim=1)  # the norms of gn and bound (and two unused)
        parts.append(torch.stack([both[0], norm(gn * factor), both[2]]).to(first))
        clipped.append((factor < 1.0).any().to(first))
    norms = parts[0] if len(parts) == 1 else norm(torch.stack(parts), dim=0)
    return AGCResult(
        grad_norm=norms[0],
        clipped_norm=norms[1],
        threshold=norms[2],
        clipped=clipped[0] if len(clipped) == 1 else torch.stack(clipped).any(),
    )
