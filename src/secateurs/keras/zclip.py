"""ZClip for Keras: z-score spike detection on the gradient norm with EMA statistics.

The recurrence of :class:`secateurs.clip.ZClip` (Kumar et al. 2025, the authors' ``zclip``
package with ``mode="zscore"``), in ``keras.ops``; see that class for the equations and for
where both differ from the package on purpose (a non-finite norm leaves the statistics alone
and is not a warm-up step). The warm-up buffer, its count, ``mu`` and ``var`` are optimizer
variables. ``tests/test_keras_rules.py`` feeds both rules the same norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

from secateurs.errors import check, check_positive
from secateurs.keras import _ops
from secateurs.keras._checks import check_open_unit, check_steps
from secateurs.keras._lerp import lerp
from secateurs.keras.rules import Rule, register
from secateurs.keras.stats import ClipStats

__all__ = ["ZClip"]

_OPTIONS = ("adaptive_scaling", "mean")


@register("zclip")
class ZClip(Rule):
    """Clip the global norm when it is a z-score outlier of its EMA statistics, and at most to
    ``max_norm`` at every step (defaults of the authors' package)."""

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_option: str = "adaptive_scaling",
        max_norm: float | None = 1.0,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = check_open_unit(alpha, "alpha")
        self.z_thresh = check_positive(z_thresh, "z_thresh")
        self.warmup_steps = check_steps(warmup_steps, "warmup_steps")
        check(clip_option in _OPTIONS, "clip_option", clip_option, ", ".join(_OPTIONS))
        self.clip_option = clip_option
        self.max_norm = None if max_norm is None else check_positive(max_norm, "max_norm")
        self.eps = check_positive(eps, "eps")
        self._vars: tuple[Any, Any, Any, Any] | None = None

    def build(self, optimizer: Any, variables: Sequence[Any]) -> None:
        add = optimizer.add_variable
        self._vars = (
            add((self.warmup_steps,), "zeros", "float32", name="zclip_warmup"),
            add((), "zeros", "int32", name="zclip_seen"),
            add((), "zeros", "float32", name="zclip_mean"),
            add((), "zeros", "float32", name="zclip_var"),
        )

    def state_variables(self) -> list[Any]:
        return list(self._vars or ())

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        assert self._vars is not None, "ZClip.build() runs first"
        variables_ = self._vars
        buf, seen, mean, var = (v.value for v in variables_)
        g = _ops.total_norm(grads)
        inf = float("inf")
        finite = g < inf
        warming = seen < self.warmup_steps
        active = ops.logical_not(warming)

        # spike test against the statistics of previous steps
        std = ops.sqrt(var)
        spread = std + self.eps
        z = (g - mean) / spread
        spike = ops.logical_and(z > self.z_thresh, active)
        target = mean + self.z_thresh**2 * std / z if self.clip_option == "adaptive_scaling" else mean
        trigger = ops.where(warming, inf, mean + self.z_thresh * spread)
        threshold = ops.where(spike, target, inf)
        if self.max_norm is not None:
            threshold = ops.minimum(threshold, self.max_norm)
            trigger = ops.minimum(trigger, self.max_norm)
        coef = _ops.coefficient(g, threshold)

        # warm-up: collect, and start the EMA once the buffer is full
        collect = ops.logical_and(warming, finite)
        slot = ops.arange(self.warmup_steps, dtype="int32") == ops.minimum(seen, self.warmup_steps - 1)
        new_buf = ops.where(ops.logical_and(slot, collect), g, buf)
        new_seen = seen + ops.cast(collect, "int32")
        start = ops.logical_and(collect, new_seen == self.warmup_steps)
        init_mean = ops.mean(new_buf)
        init_var = ops.mean(ops.square(new_buf - init_mean))

        # EMA with the clipped norm g*
        g_eff = ops.where(spike, target, g)
        new_mean = lerp(mean, g_eff, 1 - self.alpha)
        new_var = lerp(var, ops.square(g_eff - new_mean), 1 - self.alpha)
        update = ops.logical_and(finite, active)
        news = (
            new_buf,
            new_seen,
            ops.where(start, init_mean, ops.where(update, new_mean, mean)),
            ops.where(start, init_var, ops.where(update, new_var, var)),
        )
        for variable, value in zip(variables_, news, strict=True):
            variable.assign(value)

        stats = ClipStats(g, g * coef, trigger, ops.cast(coef < 1.0, "float32"))
        return _ops.scale(grads, coef), stats

    def get_config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "max_norm": self.max_norm,
            "eps": self.eps,
        }
