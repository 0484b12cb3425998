"""What one clipping step did, as tensors (never host values, so recording it costs no sync)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.clip._tensors import constant


@dataclass(frozen=True)
class ClipStats:
    """Statistics of one call of a clipping rule; every field is a 0-d tensor on the grads' device.

    ``threshold`` is the total-norm level above which the rule clips on this step: ``max_norm``
    for :class:`~secateurs.clip.GlobalNorm`, the current percentile for AutoClip, the z-score
    trigger for ZClip. Rules that bound parts of the gradient report their bound: ``Norm`` its
    per-tensor ``max_norm``, ``Value`` its element bound ``clip_value``, ``AGC`` and ``AdaGC``
    the 2-norm of their per-unit / per-tensor bounds.
    """

    norm_before: Tensor
    """Total gradient norm before clipping."""
    norm_after: Tensor
    """Total gradient norm after clipping (computed from the factors, not by another pass)."""
    threshold: Tensor
    """See the class docstring; ``inf`` when the rule would not clip at any norm."""
    clipped: Tensor
    """Boolean: some gradient was scaled down (or clamped) on this step."""

    @staticmethod
    def unclipped(norm: Tensor) -> ClipStats:
        """Stats of a step that only measured the norm (no rule)."""
        return ClipStats(
            norm_before=norm,
            norm_after=norm,
            threshold=constant(float("inf"), norm.device),
            clipped=torch.zeros((), dtype=torch.bool, device=norm.device),
        )
