"""Scores without a weight update, and the masks they choose.

- ``magnitude``: ``|w|``.
- ``wanda`` (Sun et al., 2024; locuslab/wanda): ``|w_ij| * ||X_j||_2``, the weight times the
  norm of the input feature it multiplies over the calibration rows.
- ``activation``: ``|w_ij| * mean |X_j|``, the seeds' activation x weight criterion.

:func:`keep_mask` compares them within each output row (``group="row"``, Wanda's choice), over
the whole layer (``"layer"``), or in ``N:M`` groups along the input columns.
"""

from __future__ import annotations

import torch

from secateurs.prune.calibration.stats import InputStats
from secateurs.prune.selection import lowest, nm_keep, prune_lowest_

__all__ = ["SCORED_METHODS", "keep_mask", "scores"]

SCORED_METHODS = ("magnitude", "wanda", "activation")


def scores(method: str, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    """Importance of every weight of a ``(out, columns)`` float32 matrix.

    >>> stats = InputStats(2, hessian=False)
    >>> stats.add(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    >>> scores("wanda", torch.tensor([[1.0, -2.0]]), stats)
    tensor([[5., 2.]])
    """
    magnitude = weight.abs()
    if method == "magnitude":
        return magnitude
    assert stats is not None
    if method == "wanda":
        return magnitude * stats.square_sum.to(weight.device).sqrt().unsqueeze(0)
    assert stats.abs_sum is not None, "the activation criterion needs InputStats(absolute=True)"
    return magnitude * (stats.abs_sum.to(weight.device) / max(stats.rows, 1)).unsqueeze(0)


def keep_mask(
    score: torch.Tensor,
    *,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    group: str = "row",
    run: int | None = None,
) -> torch.Tensor:
    """Bool keep-mask of a ``(out, columns)`` score matrix.

    ``group="row"`` prunes ``round(columns * sparsity)`` of every row, ``"layer"`` the
    ``round(numel * sparsity)`` lowest of the matrix (ties: the earlier weight first). With
    ``pattern=(n, m)``, every ``m`` consecutive columns within runs of ``run`` keep their ``n``
    highest scores and ``sparsity`` plays no part.

    >>> keep_mask(torch.tensor([[3.0, 1.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]]), sparsity=0.5)
    tensor([[ True, False, False,  True],
            [False, False,  True,  True]])
    """
    rows, columns = score.shape
    if pattern is not None:
        run = run or columns
        cut = score.reshape(rows * (columns // run), run)
        return nm_keep(cut, *pattern).reshape(rows, columns)
    if group == "row":
        return ~lowest(score, round(columns * sparsity), dim=1)
    keep = torch.ones_like(score, dtype=torch.bool)
    flat = score.reshape(-1)
    prune_lowest_([keep.view(-1)], lambda i, a, b: flat[a:b], round(flat.numel() * sparsity), keep_pruned=False)
    return keep
