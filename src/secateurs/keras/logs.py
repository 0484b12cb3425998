"""ClipStatsLogger: the wrapped optimizer's clip statistics in ``fit``'s logs.

Per batch: ``clip_norm_before``, ``clip_norm_after``, ``clip_threshold``, ``clip_clipped``
(1.0 when the rule clipped) of that step, and the running counts ``clip_skipped`` and
``clip_steps``. Put it before the callbacks that should see them (History and the progress
bar, which Keras adds last, always do); the epoch logs carry the last batch's values.
"""

from __future__ import annotations

from typing import Any

import keras

from secateurs.keras._model import live_values, wrapped_optimizer
from secateurs.keras.stats import STAT_NAMES

__all__ = ["ClipStatsLogger"]


class ClipStatsLogger(keras.callbacks.Callback):
    """Adds ``{prefix}{stat}`` for every stat of :data:`~secateurs.keras.stats.STAT_NAMES`."""

    def __init__(self, prefix: str = "clip_") -> None:
        super().__init__()
        self.prefix = prefix
        self._last: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        (values,) = live_values(self.model, [wrapped_optimizer(self.model).stat_variable])
        return {self.prefix + name: float(v) for name, v in zip(STAT_NAMES, values, strict=True)}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        wrapped_optimizer(self.model)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last = self._read()
        if logs is not None:
            logs.update(self._last)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs.update(self._last or self._read())
