"""AdaGC for Keras: per-tensor clipping against an EMA of each tensor's own clipped norms.

The recurrence of :class:`secateurs.clip.AdaGC` (Wang et al. 2025, the authors' released code),
in ``keras.ops``; see that class for the equations and for where both differ from the
authors' code on purpose (a non-finite step leaves every ``gamma`` alone and is not a warm-up
step). ``gamma`` has one entry per trainable variable of the optimizer, by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import initializers, ops

from secateurs.errors import check_positive
from secateurs.keras import _ops
from secateurs.keras._checks import check_open_unit, check_steps
from secateurs.keras.rules import Rule, register
from secateurs.keras.stats import ClipStats

__all__ = ["AdaGC"]


@register("adagc")
class AdaGC(Rule):
    """Adaptive per-tensor thresholds (EMA of clipped norms) after a global-clipping warm-up
    (defaults: the paper's)."""

    def __init__(
        self,
        *,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
    ) -> None:
        self.lambda_abs = check_positive(lambda_abs, "lambda_abs")
        self.lambda_rel = check_positive(lambda_rel, "lambda_rel")
        self.beta = check_open_unit(beta, "beta", closed_low=True)
        self.warmup_steps = check_steps(warmup_steps, "warmup_steps")
        self._vars: tuple[Any, Any] | None = None
        self._optimizer: Any = None

    def build(self, optimizer: Any, variables: Sequence[Any]) -> None:
        add = optimizer.add_variable
        inf = initializers.Constant(float("inf"))
        self._vars = (
            add((len(variables),), inf, "float32", name="adagc_gamma"),
            add((), "zeros", "int32", name="adagc_step"),
        )
        self._optimizer = optimizer

    def state_variables(self) -> list[Any]:
        return list(self._vars or ())

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        assert self._vars is not None, "AdaGC.build() runs first"
        gamma_var, step_var = self._vars
        gamma_all, step = gamma_var.value, step_var.value
        index = [self._optimizer._get_variable_index(v) for v in variables]
        every = index == list(range(gamma_all.shape[0]))
        gamma = gamma_all if every else ops.take(gamma_all, index)
        norms = _ops.tensor_norms(grads)

        total = ops.sqrt(ops.sum(ops.square(norms)))
        finite = ops.isfinite(total)
        warming = step < self.warmup_steps
        h_global = ops.minimum(self.lambda_abs / (total + _ops.EPS), 1.0)
        bound = self.lambda_rel * gamma
        # a tensor over its bound is scaled to it; the others keep a factor of exactly 1
        h_local = ops.where(norms > bound, bound / (norms + _ops.EPS), 1.0)
        h = ops.where(warming, h_global * ops.ones_like(norms), h_local)
        out = [g * ops.cast(h[i], g.dtype) for i, g in enumerate(grads)]

        clipped_norms = h * norms
        ema = self.beta * gamma + (1 - self.beta) * ops.minimum(norms, bound)
        new_gamma = ops.where(
            warming, ops.minimum(gamma, clipped_norms), ops.where(ops.isinf(gamma), norms, ema)
        )
        new_gamma = ops.where(finite, new_gamma, gamma)
        if every:
            gamma_var.assign(new_gamma)
        else:
            positions = ops.convert_to_tensor([[i] for i in index], "int32")
            gamma_var.assign(ops.scatter_update(gamma_all, positions, new_gamma))
        step_var.assign(step + ops.cast(finite, "int32"))

        threshold = ops.where(warming, self.lambda_abs, ops.sqrt(ops.sum(ops.square(bound))))
        clipped = ops.cast(ops.any(h < 1.0), "float32")
        return out, ClipStats(total, ops.sqrt(ops.sum(ops.square(clipped_norms))), threshold, clipped)

    def get_config(self) -> dict[str, Any]:
        return {
            "lambda_abs": self.lambda_abs,
            "lambda_rel": self.lambda_rel,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
        }
