"""AutoClip: clip to a percentile of the gradient norms seen so far.

Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks".
Each step appends the current total norm to the history, then clips the gradients to the
``percentile``-th percentile of the history (numpy's default linear interpolation), with
:func:`torch.nn.utils.clip_grad_norm_`'s factor: the rule of the paper and of its authors' code
(``autoclip.py`` in github.com/pseeth/autoclip).

Where this differs, on purpose (``tests/test_clip_reference.py`` asserts each):

* the history is a ring buffer of the last ``history`` norms (1000), kept on the gradients'
  device (the authors' code keeps every norm, in a Python list);
* non-finite norms are not recorded, so one NaN step cannot poison the threshold;
* the ``autoclip`` package (0.2.1, ``QuantileClip(quantile=0.1, global_threshold=True)``)
  takes the quantile of the norms *before* the current one, so its first step is unclipped
  and its threshold at step t + 1 is this rule's at step t. Its defaults are another rule
  (``quantile=0.9``, one history per parameter); it records a NaN norm, after which every
  gradient is NaN until that norm leaves its history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from secateurs.clip._graphs import GraphedUpdate
from secateurs.clip._tensors import (
    check_bool,
    check_norm_type,
    clip_coefficient,
    is_dense_cpu,
    scale_,
    total_norm,
    with_grad,
)
from secateurs.clip.registry import register
from secateurs.clip.rules import StatefulRule
from secateurs.clip.stats import ClipStats
from secateurs.errors import check

__all__ = ["AutoClip", "percentile"]


def percentile(sorted_values: Tensor, count: Tensor, q: float) -> Tensor:
    """numpy's linear-interpolation percentile ``q`` (0..100) of ``sorted_values[:count]``.

    ``count`` is a 0-d integer tensor (so the call needs no host read); the result is ``inf``
    when ``count`` is 0. ``torch.lerp`` interpolates from the nearer end, as numpy's ``_lerp``
    does, which keeps the result monotone.
    """
    pos = (count - 1).clamp(min=0) * (q / 100.0)
    lo = pos.floor()
    a, b = sorted_values.index_select(0, torch.stack([lo, pos.ceil()]).long())
    value = torch.lerp(a, b, (pos - lo).to(sorted_values.dtype))
    return torch.where(count > 0, value, torch.inf)


@register("autoclip")
class AutoClip(StatefulRule):
    """Clip the global gradient norm to the ``percentile``-th percentile of its history.

    Defaults follow the paper (p = 10, one threshold for all gradients); the history is bounded
    to the last ``history`` steps. The stats' ``threshold`` is that percentile (the current norm
    included, as in the paper). On CUDA the
    threshold update is replayed as one CUDA graph from the second step on
    (:mod:`~secateurs.clip._graphs`); ``cuda_graph=False`` runs it eagerly.

    >>> import torch
    >>> rule = AutoClip(percentile=50)
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> for g in (1.0, 3.0, 2.0):
    ...     w.grad = torch.tensor([g])
    ...     stats = rule([w])
    >>> stats.threshold  # median of 1, 3, 2
    tensor(2.)
    """

    def __init__(
        self,
        *,
        percentile: float = 10.0,
        history: int = 1000,
        norm_type: float | str = 2.0,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__()
        ok = isinstance(percentile, (int, float)) and not isinstance(percentile, bool)
        check(ok and 0 < percentile <= 100, "percentile", percentile, "a number in (0, 100]")
        ok = isinstance(history, int) and not isinstance(history, bool) and history >= 1
        check(ok, "history", history, "an integer >= 1")
        self.percentile = float(percentile)
        self.history = history
        self.norm_type = check_norm_type(norm_type)
        self.cuda_graph = check_bool(cuda_graph, "cuda_graph")
        self._update = GraphedUpdate(self._threshold_update, self.method, self._settings)

    def _fresh_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            # empty slots hold +inf so they sort after every recorded norm
            "history": torch.full((self.history,), torch.inf, device=device),
            "count": torch.zeros((), dtype=torch.long, device=device),
            "head": torch.zeros((), dtype=torch.long, device=device),
        }

    def clip(self, params: list[Tensor]) -> ClipStats:
        _, grads = with_grad(params)
        cpu = is_dense_cpu(grads)
        norm = total_norm(grads, self.norm_type, cpu=cpu)
        update = self._update if self.cuda_graph else self._threshold_update
        coef, threshold, after, clipped = update(norm, self._state_on(norm.device))
        scale_(grads, coef, cpu=cpu)
        return ClipStats(norm, after, threshold, clipped)

    def _threshold_update(self, norm: Tensor, st: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """Record ``norm``, take the percentile: (factor, threshold, norm after, clipped).

        Writes only ``st`` and reads nothing but ``norm`` and ``st``, so on a GPU it runs as one
        CUDA graph (:mod:`~secateurs.clip._graphs`).
        """
        hist, count, head = st["history"], st["count"], st["head"]
        value = norm.to(hist.dtype).view(1)
        finite = value < torch.inf  # a norm is >= 0 or NaN: this is isfinite in one kernel
        slot = head.view(1)
        hist.index_copy_(0, slot, torch.where(finite, value, hist.index_select(0, slot)))
        advance = finite.view(()).long()  # 0 on a non-finite step: head and count stay
        head.add_(advance).remainder_(self.history)
        count.add_(advance).clamp_(max=self.history)

        threshold = percentile(torch.sort(hist).values, count, self.percentile)
        coef = clip_coefficient(norm, threshold)
        return coef, threshold, norm * coef, coef < 1.0

    def _fields(self) -> dict[str, Any]:
        fields = {
            "percentile": self.percentile,
            "history": self.history,
            "norm_type": self.norm_type,
        }
        return fields if self.cuda_graph else {**fields, "cuda_graph": False}
