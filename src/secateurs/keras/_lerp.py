"""``torch.lerp`` in ``keras.ops``: the same rounding, so recurrences match the PyTorch rules."""

from __future__ import annotations

from typing import Any

from keras import ops


def lerp(start: Any, end: Any, weight: Any) -> Any:
    """``start + weight * (end - start)``, computed from the nearer end as torch and numpy do."""
    diff = end - start
    if isinstance(weight, float):
        return start + weight * diff if weight < 0.5 else end - diff * (1.0 - weight)
    return ops.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))
