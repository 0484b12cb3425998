"""What one clipping step did: four 0-d tensors, as :class:`secateurs.clip.ClipStats`."""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops


class ClipStats(NamedTuple):
    """Statistics of one call of a Keras clipping rule (0-d float32 tensors; ``clipped`` is 0/1).

    ``threshold`` has the meaning it has in :class:`secateurs.clip.ClipStats`: ``max_norm`` for
    GlobalNorm, the current percentile for AutoClip, the z-score trigger for ZClip.
    """

    norm_before: Any
    norm_after: Any
    threshold: Any
    clipped: Any

    @staticmethod
    def unclipped(norm: Any) -> ClipStats:
        inf = ops.convert_to_tensor(float("inf"), "float32")
        return ClipStats(norm, norm, inf, ops.zeros((), "float32"))


STAT_NAMES = ("norm_before", "norm_after", "threshold", "clipped", "skipped", "steps")
"""The clip statistics an optimizer from :func:`secateurs.keras.wrap` keeps, in this order, in
one float32 vector variable (``skipped`` and ``steps`` count since the start; the others are
the last step's)."""
