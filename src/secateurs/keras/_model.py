"""Reading a model's optimizer state from a callback, on every backend.

Under JAX, ``fit`` keeps the live variable values in ``model._jax_state`` between steps and
writes them back into the variables only at the end of an epoch (or when a callback asks,
with ``model.jax_state_sync()``, which is Keras' documented way for callbacks to do so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import backend, ops

from secateurs.errors import check


def wrapped_optimizer(model: Any, field: str = "model.optimizer") -> Any:
    """The model's :class:`~secateurs.keras.ClippedOptimizer`, or an error naming ``field``."""
    from secateurs.keras.optimizer import ClippedOptimizer

    optimizer = getattr(model, "optimizer", None)
    check(
        isinstance(optimizer, ClippedOptimizer),
        field,
        type(optimizer).__name__,
        "an optimizer from secateurs.keras.wrap(...) passed to model.compile",
    )
    return optimizer


def live_values(model: Any, variables: list[Any]) -> list[np.ndarray]:
    """Current values of optimizer ``variables`` as numpy arrays, without a state sync."""
    state = getattr(model, "_jax_state", None)
    if backend.backend() == "jax" and state and not getattr(model, "_jax_state_synced", True):
        values = state.get("optimizer_variables")
        if values:
            position = {id(v): k for k, v in enumerate(model.optimizer.variables)}
            return [np.asarray(values[position[id(v)]]) for v in variables]
    return [np.asarray(ops.convert_to_numpy(v)) for v in variables]


def sync(model: Any) -> None:
    """Write JAX's live state back into the variables (no-op on the other backends)."""
    if backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
