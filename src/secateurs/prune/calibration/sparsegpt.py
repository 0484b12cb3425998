"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix and update the weights it keeps
so that its output on the calibration inputs changes as little as possible.

As published (IST-DASLab/sparsegpt, ``sparsegpt.py``): columns whose inputs were always zero are
zeroed and get ``H[d, d] = 1``; ``H`` is dampened by a fraction of ``mean(diag H)``; the upper
Cholesky factor ``U`` of ``H^-1`` drives an optimal-brain-surgeon update column by column, in
blocks of ``block_size`` columns with a lazy update of the columns after each block. The mask is
chosen per block by ``w^2 / U_jj^2`` (for ``N:M``, inside every group of M, with the weights as
updated so far). When the Cholesky factorisation fails, the dampening grows tenfold until it
succeeds and the caller is told the dampening used: there is no silent fallback.

Two options go beyond the paper, both off by default:

- ``cross`` (``X^T X_dense``: the layer's inputs in the partly pruned model against its inputs
  in the dense model) makes the target the *dense* model's output ``W X_dense`` rather than
  ``W X``: the weights are first moved to the least-squares optimum
  ``W_eff = W cross^T (H + d I)^-1`` (so that ``||W' X - W X_dense||^2`` is
  ``||(W' - W_eff) X||^2`` plus a constant), and SparseGPT prunes ``W_eff``. Each layer then
  corrects the error of the layers pruned before it instead of reproducing it.
- ``refine`` (Boza 2024, "Fast and Optimal Weight Update for Pruned LLMs", which does it by
  ADMM): once the mask is chosen, the kept weights of every row are re-solved to the exact
  optimum of SparseGPT's own objective for that mask, ``min ||(W' - W) X||^2 + d ||W' - W||^2``
  over the kept positions, by preconditioned conjugate gradients started from SparseGPT's
  weights (at most ``refine`` iterations, every row at once). SparseGPT's column-by-column
  update is that optimum only for the first column it prunes; the later ones are greedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from secateurs.errors import SecateursError
from secateurs.prune.calibration.wanda import keep_mask

__all__ = ["InverseHessian", "inverse_hessian", "refine_kept", "sparsegpt"]

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
    """Dampen ``hessian`` (float32; the diagonal of dead columns, inputs always zero, is set to
    1), invert it by Cholesky and return the upper Cholesky factor of the inverse; the
    dampening grows tenfold on every failure (the factorisation fails, or a pivot is within
    rounding of zero: ``L_ii^2 <= 16 eps H_ii``).

    ``hessian`` is left as it is. The three LAPACK steps (factorise, invert, factorise) run in
    place in one column-major ``columns x columns`` buffer, so a wide layer costs one matrix
    beside its Hessian (out-of-place, torch holds four at once: 120 MB more for a 2816-wide
    layer). The factor is returned in that buffer (column-major; the values are the same).

    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> inv = inverse_hessian(h, 0.0)
    >>> torch.allclose(inv.factor.T @ inv.factor, torch.linalg.inv(h)), inv.attempts
    (True, 1)
    """
    columns = hessian.shape[0]
    buffer = torch.empty_strided((columns, columns), (1, columns), dtype=torch.float32, device=hessian.device)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    fraction = float(damping)
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        _dampened(hessian, fraction, out=buffer)
        diagonal = buffer.diagonal().clone()
        torch.linalg.cholesky_ex(buffer, out=(buffer, info))
        if int(info) == 0 and _pivots_sound(buffer, diagonal):
            torch.cholesky_inverse(buffer, out=buffer)
            torch.linalg.cholesky_ex(buffer, upper=True, out=(buffer, info))
            if int(info) == 0 and bool(torch.isfinite(buffer).all()):
                return InverseHessian(buffer, fraction, attempt)
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


def _pivots_sound(lower: torch.Tensor, diagonal: torch.Tensor) -> bool:
    """Whether no Cholesky pivot is lost in rounding: a singular matrix often factorises in
    float32 with pivots of the size of the rounding error in ``H_ii`` (``diagonal``), whose
    inverse is noise."""
    eps = torch.finfo(lower.dtype).eps
    return bool((lower.diagonal().square() > _PIVOT * eps * diagonal).all())


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
    cross: torch.Tensor | None = None,
    refine: int = 0,
) -> tuple[torch.Tensor, InverseHessian]:
    """Pruned and updated copy of ``weight`` (``(out, columns)``, float32), and the inverse used.

    ``hessian`` is ``X^T X`` over the calibration rows (any positive scale). ``group="layer"``
    chooses the mask over all rows of a block together (as published), ``"row"`` prunes the same
    fraction of every row in every block. With ``pattern=(n, m)`` every group of ``m``
    consecutive columns (within runs of ``run`` columns) keeps at most ``n`` weights and
    ``sparsity`` plays no part. ``cross`` (``X^T X_dense``, on the same scale as ``hessian``)
    and ``refine`` (conjugate-gradient iterations on the fixed mask) are the module's two
    options beyond the paper.
    """
    w = weight.to(torch.float32)  # never written: _sparsegpt works on its own copy
    if cross is not None:
        w = dense_target(w, hessian, cross, damping, name=name)
    pruned, inverse = _sparsegpt(w, hessian, sparsity, pattern, group, damping, block_size, run, name)
    if refine:
        pruned = refine_kept(pruned, w, hessian, inverse.damping, iterations=refine)
    return pruned, inverse


def _dampened(hessian: torch.Tensor, damping: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of ``hessian`` (into ``out`` if given) with 1 on the diagonal of dead
    columns (inputs always zero) and ``damping * mean(diag)`` added to the diagonal."""
    h = hessian.to(torch.float32, copy=True) if out is None else out.copy_(hessian)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * float(h.diagonal().mean()))
    return h


@torch.no_grad()
def dense_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damping: float, *,
                 name: str = "layer") -> torch.Tensor:
    """``W cross^T (H + d I)^-1``: the weights whose output on the partly pruned model's inputs
    ``X`` is closest to the dense output ``W X_dense`` (``cross = X^T X_dense``); columns whose
    inputs were always zero stay as they are.

    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> dense_target(torch.tensor([[1.0, -1.0]]), h, h, 0.0)  # same inputs: the same weights
    tensor([[ 1.0000, -1.0000]])
    """
    dead = hessian.diagonal() == 0
    inverse = inverse_hessian(hessian, damping, name=name)
    target = (weight.to(torch.float32) @ cross.to(torch.float32).T) @ inverse.factor.T @ inverse.factor
    target[:, dead] = weight[:, dead].to(torch.float32)
    return target


@torch.no_grad()
def refine_kept(pruned: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor, damping: float, *,
                iterations: int = 20, tolerance: float = 1e-6) -> torch.Tensor:
    """Re-solve the kept (non-zero) weights of ``pruned`` for
    ``min ||(W' - weight) X||^2 + damping * mean(diag H) * ||W' - weight||^2``, every row on its
    own mask, by Jacobi-preconditioned conjugate gradients from ``pruned`` (at most
    ``iterations``; a row stops once its residual is below ``tolerance`` of its start). Zeros
    stay zero, and the objective never rises above ``pruned``'s.

    >>> h = torch.tensor([[4.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    >>> w = torch.tensor([[1.0, 2.0, 3.0]])
    >>> refine_kept(torch.tensor([[1.0, 0.0, 3.0]]), w, h, 0.0)  # w_S = w_S + H_SS^-1 H_S,~S w_~S
    tensor([[2., 0., 4.]])
    """
    h = _dampened(hessian, damping)
    w0 = weight.to(torch.float32)
    x = pruned.to(torch.float32, copy=True)
    keep = x != 0
    diag = h.diagonal().clamp(min=torch.finfo(torch.float32).tiny)
    r = ((w0 - x) @ h).mul_(keep)  # the negative gradient, on the kept weights only
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(1)
    start = rz.clone()
    for _ in range(iterations):
        active = rz > tolerance**2 * start
        if not bool(active.any()):
            break
        hp = (p @ h) * keep
        php = (p * hp).sum(1)
        alpha = torch.where(active & (php > 0), rz / php.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        x.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), hp, value=-1)
        z = r / diag
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / rz.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        p = z + beta.unsqueeze(1) * p
        rz = torch.where(active, rz_new, rz)
    return x * keep


def _sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
    group: str, damping: float, block_size: int, run: int | None, name: str,
) -> tuple[torch.Tensor, InverseHessian]:
    w = weight.clone()
    columns = w.shape[1]
    dead = hessian.diagonal() == 0
    w[:, dead] = 0
    inverse = inverse_hessian(hessian, damping, name=name)
    hinv = inverse.factor
    groups = _groups(columns, run or columns, pattern[1]) if pattern else None
    starts = {s: e for s, e in groups} if groups else {}
    for i1, i2 in _blocks(columns, block_size, groups):
        count = i2 - i1
        # The block transposed: column i of the block is the contiguous row w1[i], so the
        # column-by-column loop below touches contiguous memory and takes three tensor ops.
        w1 = w[:, i1:i2].T.contiguous()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        if pattern is None:  # the mask of the whole block, from its weights as they are now
            score = w1.T.square() / d1.square().unsqueeze(0)  # (rows, count)
            pruned = (~keep_mask(score, sparsity=sparsity, group=group)).T.contiguous()
        else:  # N:M: each group's mask is chosen when the loop reaches it
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        drop_mask = pruned.to(w.dtype)  # (count, rows): 1 where the weight goes
        with _one_thread(w.device):  # the factorisation and the lazy updates keep every thread
            for i in range(count):
                col = i1 + i
                if pattern is not None and col in starts:
                    stop = starts[col] - i1
                    drop = (stop - i) - pattern[0]
                    if drop > 0:
                        score = w1[i:stop].T.square() / d1[i:stop].square().unsqueeze(0)
                        dropped = score.topk(drop, dim=1, largest=False).indices  # (rows, drop)
                        pruned.T.scatter_(1, i + dropped, True)
                        drop_mask[i:stop] = pruned[i:stop]
                # e = (w - q) / d with q the column with its pruned weights zeroed: the removed
                # weights over d, then spread over the block's later columns (the OBS update).
                e = torch.mul(w1[i], drop_mask[i], out=err1[i]).div_(d1[i])
                w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
        w[:, i1:i2] = w1.T.masked_fill(pruned.T, 0.0)  # a kept column is as the loop left it
        if i2 < columns:
            w[:, i2:] -= err1.T @ hinv[i1:i2, i2:]
    return w, inverse
