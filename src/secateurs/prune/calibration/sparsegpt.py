"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix and update the weights it keeps
so that its output on the calibration inputs changes as little as possible.

As published (IST-DASLab/sparsegpt, ``sparsegpt.py``): columns whose inputs were always zero are
zeroed and get ``H[d, d] = 1``; ``H`` is dampened by a fraction of ``mean(diag H)``; the upper
Cholesky factor ``U`` of ``H^-1`` drives an optimal-brain-surgeon update column by column, in
blocks of ``block_size`` columns with a lazy update of the columns after each block. The mask is
chosen per block by ``w^2 / U_jj^2`` (for ``N:M``, inside every group of M, with the weights as
updated so far). When the Cholesky factorisation fails, the dampening grows tenfold until it
succeeds and the caller is told the dampening used: there is no silent fallback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from secateurs.errors import SecateursError

__all__ = ["InverseHessian", "inverse_hessian", "sparsegpt"]

_GROWTH = 10.0
_MAX_ATTEMPTS = 16
_PIVOT = 16.0


@dataclass(frozen=True)
class InverseHessian:
    """The upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1`` and how it was found."""

    factor: torch.Tensor
    damping: float
    """The dampening fraction that worked (the one asked for unless it failed)."""
    attempts: int
    """1 when the first dampening worked."""


def inverse_hessian(hessian: torch.Tensor, damping: float, *, name: str = "layer") -> InverseHessian:
    """Dampen ``hessian`` (float32, dead columns already fixed), invert it by Cholesky and return
    the upper Cholesky factor of the inverse; the dampening grows tenfold on every failure (the
factorisation fails, or a pivot is within rounding of zero: ``L_ii^2 <= 16 eps H_ii``).

    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> inv = inverse_hessian(h, 0.0)
    >>> torch.allclose(inv.factor.T @ inv.factor, torch.linalg.inv(h)), inv.attempts
    (True, 1)
    """
    mean = float(hessian.diagonal().mean())
    fraction = float(damping)
    eye = torch.arange(hessian.shape[0], device=hessian.device)
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        damped = hessian.clone()
        damped[eye, eye] += fraction * mean
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and _pivots_sound(lower, damped):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return InverseHessian(upper, fraction, attempt)
        fraction = fraction * _GROWTH if fraction > 0 else 1e-8
    raise SecateursError(
        f"calibration: got a Hessian for {name} that stays singular with dampening up to {fraction:g} "
        "of its mean diagonal (non-finite inputs?); allowed: finite calibration inputs"
    )


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for the column loop: its operations are a few hundred
    thousand floats each, and waking other threads for them costs more than they save (50x
    slower with 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pivots_sound(lower: torch.Tensor, damped: torch.Tensor) -> bool:
    """Whether no Cholesky pivot is lost in rounding: a singular matrix often factorises in
    float32 with pivots of the size of the rounding error in ``H_ii``, whose inverse is noise."""
    eps = torch.finfo(lower.dtype).eps
    return bool((lower.diagonal().square() > _PIVOT * eps * damped.diagonal()).all())


def _groups(columns: int, run: int, m: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every N:M group: runs of ``m`` columns that never cross a kernel
    position (``run`` columns each), the last of each run possibly shorter."""
    out = []
    for base in range(0, columns, run):
        end = min(base + run, columns)
        out.extend((s, min(s + m, end)) for s in range(base, end, m))
    return out


def _blocks(columns: int, block_size: int, groups: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Blocks of about ``block_size`` columns; with N:M they end on group boundaries."""
    if groups is None:
        return [(s, min(s + block_size, columns)) for s in range(0, columns, block_size)]
    out, start = [], 0
    for _, stop in groups:
        if stop - start >= block_size:
            out.append((start, stop))
            start = stop
    if start < columns:
        out.append((start, columns))
    return out


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    group: str = "layer",
    damping: float = 0.01,
    block_size: int = 128,
    run: int | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, InverseHessian]:
    """Pruned and updated copy of ``weight`` (``(out, columns)``, float32), and the inverse used.

    ``hessian`` is ``X^T X`` over the calibration rows (any positive scale). ``group="layer"``
    chooses the mask over all rows of a block together (as published), ``"row"`` prunes the same
    fraction of every row in every block. With ``pattern=(n, m)`` every group of ``m``
    consecutive columns (within runs of ``run`` columns) keeps at most ``n`` weights and
    ``sparsity`` plays no part.
    """
    with _one_thread(weight.device):
        return _sparsegpt(weight, hessian, sparsity, pattern, group, damping, block_size, run, name)


def _sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
    group: str, damping: float, block_size: int, run: int | None, name: str,
) -> tuple[torch.Tensor, InverseHessian]:
    w = weight.to(torch.float32, copy=True)
    h = hessian.to(torch.float32, copy=True)
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    inverse = inverse_hessian(h, damping, name=name)
    hinv = inverse.factor
    groups = _groups(columns, run or columns, pattern[1]) if pattern else None
    starts = {s: e for s, e in groups} if groups else {}
    for i1, i2 in _blocks(columns, block_size, groups):
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None:
            score = w1.square() / d1.square().unsqueeze(0)
            if group == "row":
                k = round(count * sparsity)
                if k:
                    pruned.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
            else:
                k = round(score.numel() * sparsity)
                if k:
                    pruned.view(-1)[score.view(-1).argsort(stable=True)[:k]] = True
        for i in range(count):
            col = i1 + i
            if pattern is not None and col in starts:
                stop = starts[col] - i1
                drop = (stop - i) - pattern[0]
                if drop > 0:
                    score = w1[:, i:stop].square() / d1[i:stop].square().unsqueeze(0)
                    pruned.scatter_(1, i + score.topk(drop, dim=1, largest=False).indices, True)
            wcol = w1[:, i]
            d = hinv1[i, i]
            q = wcol.masked_fill(pruned[:, i], 0.0)
            q1[:, i] = q
            e = (wcol - q) / d
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        w[:, i1:i2] = q1
        if i2 < columns:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, inverse
