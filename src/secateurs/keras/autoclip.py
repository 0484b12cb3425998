"""AutoClip for Keras: clip to a percentile of the gradient norms seen so far.

The recurrence of :class:`secateurs.clip.AutoClip` (Seetharaman et al. 2020), in ``keras.ops``:
each step records the current total norm in a ring buffer of the last ``history`` norms (a
non-finite norm is not recorded), then clips to the ``percentile``-th percentile of the buffer
(numpy's linear interpolation), with torch's factor. The buffer, its fill count and its head
are optimizer variables, so they are saved with the model and traced under ``jax.jit`` and
``tf.function``. ``tests/test_keras_rules.py`` feeds both rules the same norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import initializers, ops

from secateurs.errors import check
from secateurs.keras import _ops
from secateurs.keras._lerp import lerp
from secateurs.keras.rules import Rule, register
from secateurs.keras.stats import ClipStats

__all__ = ["AutoClip", "percentile"]


def percentile(sorted_values: Any, count: Any, q: float) -> Any:
    """numpy's linear-interpolation percentile ``q`` (0..100) of ``sorted_values[:count]``
    (``inf`` when ``count`` is 0), as :func:`secateurs.clip.autoclip.percentile`."""
    pos = ops.cast(ops.maximum(count - 1, 0), "float32") * (q / 100.0)
    lo = ops.floor(pos)
    a = ops.take(sorted_values, ops.cast(lo, "int32"))
    b = ops.take(sorted_values, ops.cast(ops.ceil(pos), "int32"))
    value = lerp(a, b, pos - lo)
    return ops.where(count > 0, value, float("inf"))


@register("autoclip")
class AutoClip(Rule):
    """Clip the global gradient norm to the ``percentile``-th percentile of its history
    (defaults: the paper's p = 10, and the last 1000 steps)."""

    def __init__(self, *, percentile: float = 10.0, history: int = 1000, norm_type: float | str = 2.0) -> None:
        ok = isinstance(percentile, int | float) and not isinstance(percentile, bool)
        check(ok and 0 < percentile <= 100, "percentile", percentile, "a number in (0, 100]")
        ok = isinstance(history, int) and not isinstance(history, bool) and history >= 1
        check(ok, "history", history, "an integer >= 1")
        self.percentile = float(percentile)
        self.history = history
        self.norm_type = _ops.check_norm_type(norm_type)
        self._vars: tuple[Any, Any, Any] | None = None

    def build(self, optimizer: Any, variables: Sequence[Any]) -> None:
        add = optimizer.add_variable
        self._vars = (
            # empty slots hold +inf so they sort after every recorded norm
            add((self.history,), initializers.Constant(float("inf")), "float32", name="autoclip_history"),
            add((), "zeros", "int32", name="autoclip_count"),
            add((), "zeros", "int32", name="autoclip_head"),
        )

    def state_variables(self) -> list[Any]:
        return list(self._vars or ())

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        assert self._vars is not None, "AutoClip.build() runs first"
        hist_var, count_var, head_var = self._vars
        hist, count, head = hist_var.value, count_var.value, head_var.value
        norm = _ops.total_norm(grads, self.norm_type)
        finite = norm < float("inf")  # a norm is >= 0 or NaN: this is isfinite
        slot = ops.arange(self.history, dtype="int32") == head
        new_hist = ops.where(ops.logical_and(slot, finite), norm, hist)
        advance = ops.cast(finite, "int32")
        new_count = ops.minimum(count + advance, self.history)
        hist_var.assign(new_hist)
        head_var.assign((head + advance) % self.history)
        count_var.assign(new_count)
        threshold = percentile(ops.sort(new_hist), new_count, self.percentile)
        coef = _ops.coefficient(norm, threshold)
        stats = ClipStats(norm, norm * coef, threshold, ops.cast(coef < 1.0, "float32"))
        return _ops.scale(grads, coef), stats

    def get_config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history, "norm_type": self.norm_type}
