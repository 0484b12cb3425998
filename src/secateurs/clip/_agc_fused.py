"""AGC for every tensor of one device and dtype in one Triton kernel launch.

On a GPU the per-tensor path of :mod:`~secateurs.clip.unitwise` launches three kernels per
tensor (weight unit norms, gradient unit norms, scaling), so a model with 62 weight tensors
costs about 190 launches, which take longer than the arithmetic. Here one program handles one
unit (a row of a Linear or RNN weight, an output channel of a Conv weight, a whole bias):
it reads the unit's weights and gradients once to take both norms, computes the bound and the
factor in float32 (correctly rounded, NaN-propagating, as torch does), and scales the gradient
row in place only when the factor is below one (or NaN). The programs find their tensors
through two tables of addresses (gradients, weights) and one table of units (tensor, offset,
length), the layout the grouped-GEMM Triton tutorial uses. Memory traffic is one read of the
weights and one read of the gradients, plus a read and a write of the rows that are clipped, so
AGC costs what the issue's floor (about 1.33x a global norm clip) allows.

The unit table depends only on the shapes, so it is built once per
:class:`~secateurs.clip.unitwise.UnitPlan`; the address tables are uploaded again only when a
tensor's address changes (a fresh ``.grad`` each step usually lands where the last one was),
from pinned memory without a host sync. Every step first checks that each gradient and weight
is of the shape, dtype and device the tables were built for and lies unit by unit in memory
(contiguous or channels-last), since the kernel reads raw addresses. The caller takes the
per-tensor path for a step that fails the check, for a step inside someone else's CUDA graph
capture that would need new addresses, and for good once the kernel could not launch (Triton
builds its launcher with a C compiler on first use).

Importing this module needs Triton (bundled with CUDA builds of PyTorch). With
``TRITON_INTERPRET=1`` set before the import, the kernel runs on CPU tensors through Triton's
interpreter, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from secateurs.clip._tensors import host_values, upload
from secateurs.clip.unitwise import _units

__all__ = ["FusedSegment"]

_MAX_BLOCK = 2048


@triton.jit
def _agc_units(
    g_ptrs,
    w_ptrs,
    unit_tensor,
    unit_start,
    unit_len,
    out,
    n_units,
    clipping,
    eps,
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    u = tl.program_id(0)
    t = tl.load(unit_tensor + u)
    start = tl.load(unit_start + u)
    n = tl.load(unit_len + u)
    elem = out.dtype.element_ty
    g = tl.load(g_ptrs + t).to(tl.pointer_type(elem)) + start
    w = tl.load(w_ptrs + t).to(tl.pointer_type(elem)) + start
    lanes = tl.arange(0, BLOCK)
    g_sq = tl.zeros([BLOCK], dtype=tl.float32)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n, BLOCK):
        idx = off + lanes
        keep = idx < n
        x = tl.load(g + idx, mask=keep, other=0.0).to(tl.float32)
        y = tl.load(w + idx, mask=keep, other=0.0).to(tl.float32)
        g_sq += x * x
        w_sq += y * y
    # correctly rounded sqrt and division, and NaN-propagating max/min, as torch computes them
    # (PTX's default max/min drop a NaN): a unit with a NaN weight or gradient gets a NaN
    # factor, as on the per-tensor path
    g_norm = tl.sqrt_rn(tl.sum(g_sq, axis=0))
    w_norm = tl.sqrt_rn(tl.sum(w_sq, axis=0))
    bound = clipping * tl.maximum(w_norm, eps, propagate_nan=tl.PropagateNan.ALL)
    if EXACT:  # some bound may be under 1e-6: torch's formula, guarded by g < bound
        scaled = tl.div_rn(bound, tl.maximum(g_norm, 1e-6, propagate_nan=tl.PropagateNan.ALL))
        factor = tl.where(g_norm < bound, 1.0, scaled)
    else:  # every bound >= 1e-6: min(1, bound / g)
        scaled = tl.div_rn(bound, tl.maximum(g_norm, 1e-30, propagate_nan=tl.PropagateNan.ALL))
        factor = tl.minimum(scaled, 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out + u, g_norm.to(elem))
    tl.store(out + n_units + u, w_norm.to(elem))
    tl.store(out + 2 * n_units + u, bound.to(elem))
    tl.store(out + 3 * n_units + u, factor.to(elem))
    if (factor < 1.0) | (factor != factor):  # a NaN factor spreads to the unit, as in torch
        for off in range(0, n, BLOCK):
            idx = off + lanes
            keep = idx < n
            x = tl.load(g + idx, mask=keep, other=0.0)
            tl.store(g + idx, (x.to(tl.float32) * factor).to(elem), mask=keep)


_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# a unit's length and offsets within it are int32 in the kernel (with a block of slack)
_MAX_UNIT = 2**31 - 2 * _MAX_BLOCK
_FAILED: list[str] = []  # why the kernel could not launch here, once it could not


def _rows_dense(t: Tensor) -> bool:
    """Whether each unit of ``t`` is one dense block of memory, units in order: contiguous,
    or a channels-last Conv weight (a unit's order inside its block does not matter)."""
    if t.is_contiguous():
        return True
    layout = _CHANNELS_LAST.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


class FusedSegment:
    """The tensors ``index`` (all of one device and dtype) of a gradient list, with the tables
    the kernel reads and the ``[4, units]`` buffer it writes (gradient unit norms, weight unit
    norms, bounds, factors), laid out as :class:`~secateurs.clip.unitwise.UnitPlan`'s."""

    def __init__(self, index: Sequence[int], grads: Sequence[Tensor]) -> None:
        self.index = tuple(index)
        first = grads[self.index[0]]
        self.device = first.device
        self.dtypes = {first.dtype}
        self.devices = {first.get_device()}  # an index (-1: the CPU): cheaper than .device
        self.shapes = [grads[i].shape for i in self.index]
        tensors, starts, lengths = [], [], []
        for position, i in enumerate(self.index):
            t = grads[i]
            units = _units(t)
            length = t.numel() // units if units else 0
            tensors += [position] * units
            starts += [r * length for r in range(units)]
            lengths += [length] * units
        table = {"dtype": torch.int64, "device": self.device}
        self.unit_tensor = upload(tensors, torch.int32, self.device)
        self.unit_start = upload(starts, torch.int64, self.device)
        self.unit_len = upload(lengths, torch.int32, self.device)
        self.units = len(tensors)
        self.buffers = torch.ones((4, self.units), dtype=first.dtype, device=self.device)
        self.block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(max(lengths, default=1))))
        self._g_ptrs = torch.zeros(len(self.index), **table)
        self._w_ptrs = torch.zeros(len(self.index), **table)
        self._g_at: list[int] = []  # the addresses the tables hold
        self._w_at: list[int] = []

    @staticmethod
    def supports(tensors: Sequence[Tensor]) -> bool:
        """Whether the kernel's int32 unit lengths and indices can describe ``tensors``."""
        units = sum(map(_units, tensors))
        longest = max((t.numel() // max(1, _units(t)) for t in tensors), default=0)
        return longest < _MAX_UNIT and 4 * units < 2**31

    def apply_(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], clipping: float, eps: float
    ) -> bool:
        """Clip this segment's gradients in place and fill :attr:`buffers`; False (nothing
        done) unless every gradient and weight is of the shape, dtype and device the tables
        were built for and lies unit by unit in memory (the kernel reads raw addresses:
        anything else would make it read the wrong bytes), and in the other cases the module
        docstring lists."""
        gs = [grads[i] for i in self.index]
        ws = [params[i] for i in self.index]
        if _FAILED or not self._usable(gs, ws):
            return False
        g_at, w_at = list(map(Tensor.data_ptr, gs)), list(map(Tensor.data_ptr, ws))
        moved = g_at != self._g_at or w_at != self._w_at
        if moved and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # inside someone else's graph capture an upload would be replayed later from a
            # host buffer that is gone by then
            return False
        if g_at != self._g_at:
            self._g_ptrs.copy_(host_values(g_at, torch.int64, self.device), non_blocking=True)
            self._g_at = g_at
        if w_at != self._w_at:
            self._w_ptrs.copy_(host_values(w_at, torch.int64, self.device), non_blocking=True)
            self._w_at = w_at
        if not self.units:
            return True
        exact = clipping * eps < 1e-6
        # Triton launches on the current device: make it the tensors'
        where = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        try:
            with where:
                _agc_units[(self.units,)](
                    self._g_ptrs, self._w_ptrs, self.unit_tensor, self.unit_start, self.unit_len,
                    self.buffers, self.units, clipping, eps, EXACT=exact, BLOCK=self.block,
                )  # fmt: skip
        except Exception as exc:  # e.g. no C compiler for Triton's launcher on a slim image
            _FAILED.append(str(exc))
            warnings.warn(
                f"agc: the Triton kernel could not run ({exc}); AGC takes the per-tensor path",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def _usable(self, gs: list[Tensor], ws: list[Tensor]) -> bool:
        # map over C methods: about 0.3 us a tensor on a slow CPU, all checks together
        return (
            list(map(_shape, gs)) == self.shapes
            and list(map(_shape, ws)) == self.shapes
            and (all(map(Tensor.is_contiguous, gs)) or all(map(_rows_dense, gs)))
            and (all(map(Tensor.is_contiguous, ws)) or all(map(_rows_dense, ws)))
            and set(map(_dtype, gs)) == self.dtypes
            and set(map(_dtype, ws)) == self.dtypes
            and set(map(Tensor.get_device, gs)) == self.devices
            and set(map(Tensor.get_device, ws)) == self.devices
        )
