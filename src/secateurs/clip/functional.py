"""Stateless clipping functions, in place on ``.grad`` (or on the parameters for ``clamp_params_``).

Each returns the total norm *before* clipping as a 0-d tensor, never a Python float, so a
training loop can log it without forcing a device-to-host copy.

>>> import torch
>>> w = torch.nn.Parameter(torch.zeros(3))
>>> w.grad = torch.tensor([3.0, 4.0, 0.0])
>>> by_global_norm_([w], max_norm=1.0)
tensor(5.)
>>> w.grad
tensor([0.6000, 0.8000, 0.0000])
"""

from __future__ import annotations

import torch
from torch import Tensor

from secateurs.clip._tensors import (
    Params,
    _groups,
    as_list,
    check_norm_type,
    clip_coefficient,
    combine_norms,
    dense_grads,
    has_dtensor,
    is_dense_cpu,
    local,
    per_tensor_norms,
    scale_,
    scale_each_,
    total_norm,
    with_grad,
)
from secateurs.clip.unitwise import UnitPlan, agc_apply_
from secateurs.errors import check, check_optional_bool, check_positive

__all__ = ["agc_", "by_global_norm_", "by_norm_", "by_value_", "clamp_params_"]


def _clamp_(tensors: list[Tensor], low: float | None, high: float | None) -> None:
    tensors = local(tensors)
    for (device, _), (ts, _) in _groups(tensors).items():
        if device.type in ("cpu", "cuda"):
            if low is not None:
                torch._foreach_clamp_min_(ts, low)
            if high is not None:
                torch._foreach_clamp_max_(ts, high)
        else:
            for t in ts:
                t.clamp_(min=low, max=high)


@dense_grads
@torch.no_grad()
def by_value_(params: Params, clip_value: float) -> Tensor:
    """Clamp every gradient element into ``[-clip_value, clip_value]``.

    Same result as :func:`torch.nn.utils.clip_grad_value_`; returns the total 2-norm of the
    gradients before clamping.

    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([-3.0, 0.5])
    >>> by_value_([w], 1.0); w.grad
    tensor(3.0414)
    tensor([-1.0000,  0.5000])
    """
    c = check_positive(clip_value, "clip_value")
    _, grads = with_grad(as_list(params))
    norm = total_norm(grads)
    _clamp_(grads, -c, c)
    return norm


@dense_grads
@torch.no_grad()
def by_norm_(params: Params, max_norm: float, *, norm_type: float | str = 2.0) -> Tensor:
    """Scale each gradient on its own so that its p-norm is at most ``max_norm``.

    Each tensor gets the factor :func:`torch.nn.utils.clip_grad_norm_` would give it alone:
    ``min(max_norm / (norm + 1e-6), 1)``. Returns the total p-norm before clipping.
    """
    m = check_positive(max_norm, "max_norm")
    p = check_norm_type(norm_type)
    _, grads = with_grad(as_list(params))
    if not grads:
        return torch.zeros(())
    norms = per_tensor_norms(grads, p)
    scale_each_(grads, list(clip_coefficient(norms, m).unbind()))
    return combine_norms(norms, p)


@dense_grads
@torch.no_grad()
def by_global_norm_(params: Params, max_norm: float, *, norm_type: float | str = 2.0) -> Tensor:
    """Scale all gradients together so that their joint p-norm is at most ``max_norm``.

    Same result as :func:`torch.nn.utils.clip_grad_norm_` (any p, ``inf`` included; DTensor
    gradients included). When every gradient is on the CPU, reading the norm costs no device
    sync, so the scaling pass is skipped if nothing needs clipping; on other devices the
    factor (1.0 when under the threshold) is always applied, without a host read.
    """
    m = check_positive(max_norm, "max_norm")
    p = check_norm_type(norm_type)
    _, grads = with_grad(as_list(params))
    if not grads:
        return torch.zeros(())
    cpu = is_dense_cpu(grads)
    norm = total_norm(grads, p, cpu=cpu)
    coef = clip_coefficient(norm, m)
    # `not coef >= 1` also scales when the norm is NaN, as torch does (the grads become NaN)
    if not cpu or not bool(coef >= 1.0):
        scale_(grads, coef, cpu=cpu)
    return norm


@dense_grads
@torch.no_grad()
def agc_(
    params: Params, clipping: float = 0.01, *, eps: float = 1e-3, fused: bool | None = None
) -> Tensor:
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization").

    A unit's gradient is scaled down when its norm exceeds ``clipping * max(||W_unit||, eps)``;
    units are rows of Linear/RNN weights and output channels of Conv weights, and each 1-D
    parameter (bias, norm gain) is one unit (see :mod:`secateurs.clip.unitwise`). Brock et al.
    leave the final classifier layer unclipped: pass the parameters without it to do the same.
    Returns the total 2-norm of the gradients before clipping. ``fused`` picks the one-kernel
    CUDA path as in :class:`~secateurs.clip.unitwise.UnitPlan` (the :class:`~secateurs.clip.AGC`
    rule also keeps the layout it builds from step to step).

    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 10.0]]))
    >>> w.grad = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> agc_([w], clipping=0.5); w.grad  # row 0 may have |g| <= 0.5, row 1 <= 5
    tensor(1.4142)
    tensor([[0.0000, 0.5000],
            [0.0000, 1.0000]])
    """
    lam = check_positive(clipping, "clipping")
    e = check_positive(eps, "eps")
    check_optional_bool(fused, "fused")
    kept, grads = with_grad(as_list(params))
    if not grads:
        return torch.zeros(())
    plan = None if has_dtensor(grads) else UnitPlan(grads, kept, fused=fused)
    return agc_apply_(kept, grads, lam, e, plan).grad_norm


@torch.no_grad()
def clamp_params_(params: Params, min: float | None = None, max: float | None = None) -> Tensor:
    """Clamp parameter *values* into ``[min, max]`` (either bound may be None), in place.

    Used for weight clipping, e.g. the critic of a WGAN. Returns the total 2-norm of the
    parameters before clamping.

    >>> w = torch.nn.Parameter(torch.tensor([-2.0, 0.5]))
    >>> clamp_params_([w], -1.0, 1.0); w.data
    tensor(2.0616)
    tensor([-1.0000,  0.5000])
    """
    number = (int, float)
    for name, bound in (("min", min), ("max", max)):
        ok = bound is None or (isinstance(bound, number) and not isinstance(bound, bool))
        check(ok, name, bound, "a number or None")
    check(min is not None or max is not None, "min/max", (min, max), "at least one bound")
    if min is not None and max is not None:
        check(min <= max, "min", min, f"a number <= max ({max})")
    values = [p.detach() for p in as_list(params)]
    norm = total_norm(values)
    _clamp_(values, None if min is None else float(min), None if max is None else float(max))
    return norm
