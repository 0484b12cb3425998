"""ZClip: z-score spike detection on the gradient norm with EMA statistics.

Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"; the recurrence is
that of the authors' package (``zclip`` 1.0.0, ``ZClip(mode="zscore")``), with ``g_t`` the
total 2-norm at step t:

* warm-up: the first ``warmup_steps`` norms are only collected; then ``mu`` and ``var`` start
  as their mean and (population) variance;
* afterwards ``z_t = (g_t - mu) / (sqrt(var) + eps)``; if ``z_t > z_thresh`` the adaptive
  threshold is ``g* = mu + z_thresh**2 * sqrt(var) / z_t`` (``"adaptive_scaling"``) or ``mu``
  (``"mean"``), otherwise ``g* = g_t``;
* at every step, warm-up included, the gradients are clipped to ``min(g*, max_norm)``:
  ``max_norm`` (1.0, as the package's ``max_grad_norm``) is a ceiling over the adaptive
  threshold; ``None`` switches it off;
* ``mu <- alpha mu + (1 - alpha) g*``; ``var <- alpha var + (1 - alpha) (g* - mu)**2``
  (with the updated ``mu``): the statistics follow the adaptive ``g*``, not the ceiling.

Without the ceiling, an exploding network runs its warm-up unclipped and the statistics are
then built on exploded norms (on ``bench/clip_quality.py`` that network learns nothing).

Where this differs from the package, on purpose (``tests/test_clip_reference.py`` asserts
each):

* a non-finite norm leaves the statistics unchanged and does not count as a warm-up step (the
  package appends it to the warm-up buffer or to the EMA, whose mean is NaN from then on, so
  the rule silently becomes plain ``max_grad_norm`` clipping); on that step the gradients are
  multiplied by a NaN factor, as :func:`torch.nn.utils.clip_grad_norm_` does, for
  :func:`~secateurs.clip.wrap` to skip (the package leaves them unscaled);
* only the package's ``mode="zscore"`` with ``clip_factor=1.0`` and
  ``skip_update_on_spike=False`` (its defaults) is implemented;
* the statistics are float32 tensors on the gradients' device (the package's are Python
  floats read from the device every step), so values agree to float32 rounding.

Everything is computed with tensor selects, so the step never reads the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from secateurs.clip._graphs import GraphedUpdate
from secateurs.clip._tensors import (
    check_bool,
    check_positive,
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

__all__ = ["ZClip"]

_OPTIONS = ("adaptive_scaling", "mean")


@register("zclip")
class ZClip(StatefulRule):
    """Clip the global norm when it is a z-score outlier of its EMA statistics, and at most to
    ``max_norm`` at every step.

    Defaults are those of the authors' package: ``alpha=0.97``, ``z_thresh=2.5``,
    ``warmup_steps=25`` (the paper's) and ``max_norm=1.0``. The stats' ``threshold`` is the trigger
    ``min(mu + z_thresh * (sqrt(var) + eps), max_norm)`` (``max_norm``, or inf without one,
    during warm-up); when the z-test fires, the gradients are scaled to the lower
    ``min(g*, max_norm)`` above. On CUDA the statistics update is replayed as one CUDA graph
    from the second step on (:mod:`~secateurs.clip._graphs`), the ceiling inside it;
    ``cuda_graph=False`` runs it eagerly.

    >>> import torch
    >>> rule = ZClip(warmup_steps=2)
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> w.grad = torch.tensor([5.0])
    >>> rule([w]).norm_after  # warm-up: no statistics yet, but the ceiling holds
    tensor(1.0000)
    """

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_option: str = "adaptive_scaling",
        max_norm: float | None = 1.0,
        eps: float = 1e-6,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__()
        ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1
        check(ok, "alpha", alpha, "a number in (0, 1)")
        self.alpha = float(alpha)
        self.z_thresh = check_positive(z_thresh, "z_thresh")
        ok = isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool)
        check(ok and warmup_steps >= 1, "warmup_steps", warmup_steps, "an integer >= 1")
        self.warmup_steps = warmup_steps
        check(clip_option in _OPTIONS, "clip_option", clip_option, ", ".join(_OPTIONS))
        self.clip_option = clip_option
        self.max_norm = None if max_norm is None else check_positive(max_norm, "max_norm")
        self.eps = check_positive(eps, "eps")
        self.cuda_graph = check_bool(cuda_graph, "cuda_graph")
        self._update = GraphedUpdate(self._statistics_update, self.method, self._settings)

    def _fresh_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "warmup": torch.zeros(self.warmup_steps, device=device),
            "seen": torch.zeros((), dtype=torch.long, device=device),
            "mean": torch.zeros((), device=device),
            "var": torch.zeros((), device=device),
        }

    def clip(self, params: list[Tensor]) -> ClipStats:
        _, grads = with_grad(params)
        cpu = is_dense_cpu(grads)
        norm = total_norm(grads, cpu=cpu)
        update = self._update if self.cuda_graph else self._statistics_update
        coef, trigger, after, clipped = update(norm, self._state_on(norm.device))
        scale_(grads, coef, cpu=cpu)
        return ClipStats(norm, after, trigger, clipped)

    def _statistics_update(self, norm: Tensor, st: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """The factor for ``norm`` and the updated statistics: (factor, trigger, norm after,
        clipped). Writes only ``st`` and reads nothing but ``norm`` and ``st``, so on a GPU it
        runs as one CUDA graph (:mod:`~secateurs.clip._graphs`)."""
        buf, seen, mean, var = st["warmup"], st["seen"], st["mean"], st["var"]
        g = norm.float()
        finite = g < torch.inf  # a norm is >= 0 or NaN: this is isfinite in one kernel
        warming = seen < self.warmup_steps
        active = ~warming

        # spike test against the statistics of previous steps
        std = var.sqrt()
        spread = std + self.eps
        z = (g - mean) / spread
        spike = (z > self.z_thresh) & active
        if self.clip_option == "adaptive_scaling":
            target = mean + self.z_thresh**2 * std / z
        else:
            target = mean
        trigger = torch.where(warming, torch.inf, mean + self.z_thresh * spread)
        threshold = torch.where(spike, target, torch.inf)
        if self.max_norm is not None:
            threshold = torch.clamp(threshold, max=self.max_norm)
            trigger = torch.clamp(trigger, max=self.max_norm)
        coef = clip_coefficient(norm, threshold)

        # warm-up: collect, and initialise the EMA once the buffer is full
        collect = warming & finite
        slot = seen.clamp(max=self.warmup_steps - 1).view(1)
        buf.index_copy_(0, slot, torch.where(collect, g.view(1), buf.index_select(0, slot)))
        seen.add_(collect.long())
        start = collect & (seen == self.warmup_steps)
        init_var, init_mean = torch.var_mean(buf, correction=0)

        # EMA update after warm-up, with the clipped norm g*: lerp(x, y, 1 - alpha) is
        # alpha * x + (1 - alpha) * y
        g_eff = torch.where(spike, target, g)
        new_mean = torch.lerp(mean, g_eff, 1 - self.alpha)
        new_var = torch.lerp(var, (g_eff - new_mean).square(), 1 - self.alpha)
        update = finite & active
        mean.copy_(torch.where(start, init_mean, torch.where(update, new_mean, mean)))
        var.copy_(torch.where(start, init_var, torch.where(update, new_var, var)))

        return coef, trigger, norm * coef, coef < 1.0

    def _check_loaded(self, key: str, value: Tensor, like: Tensor) -> None:
        if key == "warmup":
            field = f"{self.method}.state_dict['warmup']"
            allowed = f"{like.numel()} values (warmup_steps={self.warmup_steps})"
            check(value.shape == like.shape, field, tuple(value.shape), allowed)
        else:
            super()._check_loaded(key, value, like)

    def _fields(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "max_norm": self.max_norm,
            "eps": self.eps,
            **({} if self.cuda_graph else {"cuda_graph": False}),
        }
