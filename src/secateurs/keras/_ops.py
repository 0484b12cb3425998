"""Norms and factors in ``keras.ops``, shared by the Keras clipping rules.

Every reduction runs in float32 whatever the gradients' dtype, and every factor is the one
:func:`torch.nn.utils.clip_grad_norm_` applies, ``min(max_norm / (norm + 1e-6), 1)``, so the
Keras rules and :mod:`secateurs.clip` agree on the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import backend, ops

from secateurs.errors import check

EPS = 1e-6


def f32(x: Any) -> Any:
    return ops.cast(x, "float32")


def check_norm_type(norm_type: float | str, field: str = "norm_type") -> float:
    """``norm_type`` as a float p >= 1 (``inf`` or the string ``"inf"`` allowed)."""
    allowed = "a number >= 1, or inf"
    if isinstance(norm_type, str):
        check(norm_type.strip().lower() in ("inf", "infinity"), field, norm_type, allowed)
        return math.inf
    ok = isinstance(norm_type, int | float) and not isinstance(norm_type, bool)
    check(ok and float(norm_type) >= 1.0, field, norm_type, allowed)
    return float(norm_type)


def tensor_norms(grads: Sequence[Any], p: float = 2.0) -> Any:
    """Vector of the p-norm of each tensor, in order (float32)."""
    return ops.stack([_norm(f32(g), p) for g in grads])


def _norm(x: Any, p: float) -> Any:
    if p == math.inf:
        return ops.max(ops.abs(x)) if math.prod(x.shape) else ops.zeros((), "float32")
    if p == 2.0:
        return ops.sqrt(ops.sum(ops.square(x)))
    if p == 1.0:
        return ops.sum(ops.abs(x))
    return ops.power(ops.sum(ops.power(ops.abs(x), p)), 1.0 / p)


def combine(norms: Any, p: float = 2.0) -> Any:
    """The total p-norm from a vector of per-tensor p-norms."""
    return _norm(norms, p)


def _torch_float32(grads: Sequence[Any]) -> bool:
    """On the torch backend, with every gradient a float32 torch tensor: the fast path.

    Keras' torch backend runs each ``keras.ops`` call eagerly through Python (dtype and
    argument handling, then one kernel), so a step spent more time in the per-tensor norm and
    scale calls than in their arithmetic. There, the norm and the scaling are torch's
    multi-tensor kernels (``torch._foreach_norm`` / ``torch._foreach_mul``, what
    ``clip_grad_norm_`` runs): the same numbers to float rounding, one Python call each."""
    if backend.backend() != "torch":
        return False
    import torch

    return all(isinstance(g, torch.Tensor) and g.dtype == torch.float32 for g in grads)


def total_norm(grads: Sequence[Any], p: float = 2.0) -> Any:
    """p-norm of all ``grads`` viewed as one vector (float32, 0-d)."""
    if p == 2.0 and grads and _torch_float32(grads):
        import torch

        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    if p == 2.0:  # one sum of squares per tensor, one square root
        return ops.sqrt(ops.sum(ops.stack([ops.sum(ops.square(f32(g))) for g in grads])))
    return combine(tensor_norms(grads, p), p)


def coefficient(norm: Any, max_norm: Any) -> Any:
    """``min(max_norm / (norm + 1e-6), 1)``: NaN for a NaN norm, 0 for an infinite one."""
    return ops.minimum(max_norm / (norm + EPS), 1.0)


def scale(grads: Sequence[Any], factor: Any) -> list[Any]:
    """Each gradient times ``factor`` (cast to its dtype)."""
    if grads and _torch_float32(grads) and _torch_float32([factor]):
        import torch

        return list(torch._foreach_mul(list(grads), factor))
    return [g * ops.cast(factor, g.dtype) for g in grads]


def is_finite(x: Any) -> Any:
    return ops.all(ops.isfinite(x))
