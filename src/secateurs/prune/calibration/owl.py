"""OWL (Yin et al., 2024; luuyin/OWL): outlier-weighted per-layer sparsities.

Each layer (a Transformer block, or a prunable module of its own) gets its outlier ratio: the
fraction of its Wanda scores ``|w| * ||x||`` above ``m`` times their mean. Layers with more
outliers are pruned less: the ratios are rescaled to a spread of ``2 * lam``, centred so that
their mean sparsity is the target, as in the published code. Where the layers differ in size
(a pooler or a head beside the blocks), the mean is weighted by their weights, so the model as a
whole gets the target: unweighted, a small layer pruned hard would stand in for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from secateurs.errors import check, check_fraction

__all__ = ["OWL", "outlier_ratio", "owl_sparsities"]


@dataclass(frozen=True)
class OWL:
    """OWL's two hyper-parameters: the outlier threshold ``m`` (times the layer's mean score)
    and ``lam``, half the spread of the per-layer sparsities around the target."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        check(isinstance(self.m, int | float) and not isinstance(self.m, bool) and self.m > 0, "owl.m", self.m, "a number > 0")
        check_fraction(self.lam, "owl.lam", high=0.5)


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all ``scores`` (taken together) above ``m`` times their mean.

    >>> outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], 2.0)
    0.25
    """
    flat = torch.cat([s.reshape(-1).to(torch.float32) for s in scores])
    threshold = flat.mean() * m
    return float((flat > threshold).sum()) / max(flat.numel(), 1)


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float,
                   sizes: Sequence[int] | None = None) -> list[float]:
    """One sparsity per layer from its outlier ratio (more outliers, lower sparsity), with mean
    ``sparsity`` weighted by ``sizes`` (the layers' weight counts; equal when None).

    >>> [round(s, 3) for s in owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.08)]
    [0.58, 0.5, 0.42]
    >>> [round(s, 3) for s in owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.08, sizes=[1, 1, 2])]
    [0.6, 0.52, 0.44]
    """
    values = torch.tensor(list(ratios), dtype=torch.float64)
    spread = values.max() - values.min() if values.numel() else torch.tensor(0.0)
    if values.numel() < 2 or float(spread) == 0.0:
        return [sparsity] * len(ratios)
    weights = torch.ones_like(values) if sizes is None else torch.tensor(list(sizes), dtype=torch.float64)
    keep = (values - values.min()) / spread * (2 * lam)
    keep = keep - (keep * weights).sum() / weights.sum() + (1 - sparsity)
    return [min(max(1.0 - float(k), 0.0), 0.99) for k in keep]
