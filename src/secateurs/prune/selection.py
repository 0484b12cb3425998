"""Choosing which weights to prune from their scores.

Two selections, both writing bool keep-masks in place:

- :func:`prune_lowest_` prunes the ``k`` lowest-scoring weights of a pool of tensors taken
  together (one tensor for layer-wise pruning, every targeted weight for global pruning). It is
  an exact radix select over the scores' bit patterns: two histogram passes find the ``k``-th
  smallest score, a third writes the masks, all in chunks of a quarter million scores. Nothing the
  size of the model is ever concatenated or sorted, so selecting over 25M weights costs a few
  tenths of a second and a few MB beyond the masks. Ties are broken like a stable sort of all
  scores in model order: the earlier weight is pruned first. The passes run on one intra-op
  thread (see :func:`_one_thread`).
- :func:`lowest` marks the ``k`` lowest scores of one tensor (or of each of its rows) with
  :func:`torch.kthvalue` and the same tie-breaking, in linear time: a stable sort's first
  ``k``, without the sort.
- :func:`nm_keep` keeps the ``N`` highest scores in every block of ``M`` consecutive weights
  along the input dimension (dim 1), the layout sparse tensor cores accelerate for 2:4.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from secateurs.errors import SecateursError

__all__ = ["CHUNK", "ScoreFn", "lowest", "nm_keep", "parse_pattern", "prune_lowest_"]

CHUNK = 1 << 18
"""Scores are computed, histogrammed and compared this many at a time."""

ScoreFn = Callable[[int, int, int], torch.Tensor]
"""``score_fn(i, start, stop)``: the scores of flat elements ``start:stop`` of tensor ``i``."""

_BINS = 1 << 16


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"N:M"`` (or ``(N, M)``) as a pair of ints, checking ``1 <= N < M``.

    >>> parse_pattern("2:4")
    (2, 4)
    """
    if pattern is None:
        return None
    allowed = "'N:M' with integers 1 <= N < M, e.g. '2:4'"
    if isinstance(pattern, str):
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not found:
            raise SecateursError(f"pattern: got {pattern!r}; allowed: {allowed}")
        n, m = int(found.group(1)), int(found.group(2))
    elif isinstance(pattern, tuple | list) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = pattern
    else:
        raise SecateursError(f"pattern: got {pattern!r}; allowed: {allowed}")
    if not 1 <= n < m:
        raise SecateursError(f"pattern: got {pattern!r}; N must be at least 1 and below M; allowed: {allowed}")
    return n, m


def _chunks(sizes: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    for i, size in enumerate(sizes):
        for start in range(0, size, CHUNK):
            yield i, start, min(start + CHUNK, size)


def _key_dtype(score_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(float dtype the scores are compared in, int dtype of their keys)."""
    if score_dtype == torch.float64:
        return torch.float64, torch.int64
    if score_dtype.is_floating_point:
        return torch.float32, torch.int32
    raise TypeError(f"scores must be floating point, got {score_dtype}")


def _keys(scores: torch.Tensor, float_dtype: torch.dtype, int_dtype: torch.dtype, signed: bool) -> torch.Tensor:
    """Integers that sort like the scores. Non-negative floats already do (IEEE 754 bit order);
    negative ones need their magnitude bits flipped."""
    keys = scores.to(float_dtype).contiguous().view(int_dtype)
    if signed:
        bits = torch.iinfo(int_dtype).bits
        keys = keys ^ ((keys >> (bits - 1)) & ((1 << (bits - 1)) - 1))
    return keys


def _kth_key(keys_of: Callable[[], Iterator[torch.Tensor]], k: int, bits: int) -> tuple[int, int]:
    """The ``k``-th smallest key ``t`` (1-based) and how many keys equal to ``t`` are within the
    ``k`` smallest, by a most-significant-digit radix select with 16-bit digits."""
    prefix: int | None = None
    below = 0
    for level in range(bits // 16):
        shift = bits - 16 * (level + 1)
        hist: torch.Tensor | None = None
        for keys in keys_of():
            if prefix is not None:
                keys = keys[(keys >> (shift + 16)) == prefix]
            digits = keys >> shift
            digits = digits + (_BINS // 2) if level == 0 else digits & (_BINS - 1)
            counts = torch.bincount(digits, minlength=_BINS)
            hist = counts if hist is None else hist.add_(counts)
        assert hist is not None
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(k - below, device=cumulative.device)))
        if digit > 0:
            below += int(cumulative[digit - 1])
        value = digit - _BINS // 2 if level == 0 else digit
        prefix = value if prefix is None else (prefix << 16) | value
    assert prefix is not None
    return prefix, k - below


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (torch's setting is process-wide; restored after).

    The passes are a few thousand small kernels (a quarter million scores each), every one a
    parallel region on more than one thread. On a machine whose cores are busy (data-loader
    workers, other jobs) each region waits for a thread that is not running: measured on 2
    busy cores, 25M scores took 7.5 s on two threads and 0.24 s on one. On an idle machine one
    thread is about as fast, since the passes are bound by memory, not arithmetic.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def prune_lowest_(
    masks: Sequence[torch.Tensor],
    score_fn: ScoreFn,
    k: int,
    *,
    keep_pruned: bool = True,
    signed: bool = False,
) -> int:
    """Rewrite the keep-masks ``masks`` so that the ``k`` lowest-scoring weights are pruned.

    ``masks`` are contiguous bool tensors; the scores of tensor ``i`` come from ``score_fn``.
    With ``keep_pruned`` the weights already pruned stay pruned (they rank below every score),
    and ``k`` is raised to their count if it is below it. ``signed`` says scores may be
    negative. Returns the number of pruned weights.

    >>> masks = [torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    >>> scores = [torch.tensor([0.5, 0.1, 0.9, 0.3]), torch.tensor([0.2, 0.8])]
    >>> prune_lowest_(masks, lambda i, a, b: scores[i][a:b], 3)
    3
    >>> masks
    [tensor([ True, False,  True, False]), tensor([False,  True])]
    """
    with _one_thread():
        return _prune_lowest(masks, score_fn, k, keep_pruned=keep_pruned, signed=signed)


def _prune_lowest(
    masks: Sequence[torch.Tensor], score_fn: ScoreFn, k: int, *, keep_pruned: bool, signed: bool
) -> int:
    flat = [m.view(-1) for m in masks]
    sizes = [m.numel() for m in flat]
    total = sum(sizes)
    pruned_before = sum(size - int(m.count_nonzero()) for size, m in zip(sizes, flat, strict=True)) if keep_pruned else 0
    k = min(max(int(k), pruned_before), total)
    if k == 0:
        for m in flat:
            m.fill_(True)
        return 0
    score_dtype = torch.float32
    for i, size in enumerate(sizes):
        if size and score_fn(i, 0, 1).dtype == torch.float64:
            score_dtype = torch.float64
    float_dtype, int_dtype = _key_dtype(score_dtype)
    lowest = torch.tensor(torch.iinfo(int_dtype).min, dtype=int_dtype, device=flat[0].device)
    force = keep_pruned and pruned_before > 0

    def keys_at(i: int, start: int, stop: int) -> torch.Tensor:
        keys = _keys(score_fn(i, start, stop), float_dtype, int_dtype, signed)
        if force:
            keys = torch.where(flat[i][start:stop], keys, lowest)
        return keys

    def keys_of() -> Iterator[torch.Tensor]:
        for i, start, stop in _chunks(sizes):
            yield keys_at(i, start, stop)

    threshold, ties_to_prune = _kth_key(keys_of, k, torch.iinfo(int_dtype).bits)
    for i, start, stop in _chunks(sizes):
        keys = keys_at(i, start, stop)
        out = flat[i][start:stop]
        torch.ge(keys, threshold, out=out)
        if ties_to_prune:
            ties = (keys == threshold).nonzero().view(-1)[:ties_to_prune]
            out[ties] = False
            ties_to_prune -= ties.numel()
    return k


@torch.no_grad()
def lowest(scores: torch.Tensor, k: int, *, dim: int | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores of ``scores`` (``dim=None``) or of every slice along
    ``dim``; ties go to the earlier index, so the mask is that of ``argsort(stable=True)[:k]``.

    >>> lowest(torch.tensor([[3.0, 1.0, 1.0, 4.0], [2.0, 2.0, 2.0, 0.0]]), 2, dim=1)
    tensor([[False,  True,  True, False],
            [ True, False, False,  True]])
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if dim is None:
        return lowest(scores.reshape(1, -1), k, dim=1).view(scores.shape)
    x = scores.movedim(dim, -1)
    if k >= x.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = x.kthvalue(k, dim=-1, keepdim=True).values
    below = x < kth
    ties = x == kth
    room = k - below.sum(-1, keepdim=True)  # how many of the ties at the k-th value are taken
    mask = below | (ties & (ties.cumsum(-1) <= room))
    return mask.movedim(-1, dim)


@torch.no_grad()
def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every block of ``m`` along dim 1.

    Blocks run along the input dimension (dim 1 of a Linear, Conv or RNN weight, after the
    kernel positions): ``weight.movedim(1, -1)`` is cut into runs of ``m``. A short last block
    keeps at most ``n``. A 1-D tensor is cut along its only dimension.

    >>> nm_keep(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 7.0, 6.0]]), 2, 4)
    tensor([[ True, False,  True, False, False, False,  True,  True]])
    """
    x = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    moved = x.movedim(1, -1) if x.dim() > 1 else x
    shape = moved.shape
    rows = moved.reshape(-1, shape[-1])
    pad = (-shape[-1]) % m
    if pad:
        rows = F.pad(rows, (0, pad), value=float("-inf"))
    blocks = rows.reshape(rows.shape[0], -1, m)
    top = blocks.topk(n, dim=-1).indices
    keep = torch.zeros(blocks.shape, dtype=torch.bool, device=blocks.device).scatter_(-1, top, True)
    keep = keep.reshape(rows.shape[0], -1)[:, : shape[-1]].reshape(shape)
    return (keep.movedim(-1, 1) if x.dim() > 1 else keep).contiguous()
