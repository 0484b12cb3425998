"""Clipping rules: small objects applied to parameters after ``backward()``, before ``step()``.

A rule is called on the parameters (``rule(model.parameters())``), clips their ``.grad`` in place
and returns a :class:`~secateurs.clip.stats.ClipStats` of tensors. Stateful rules keep their
state as tensors on the gradients' device and round-trip it through ``state_dict()`` /
``load_state_dict()``, like an optimizer. No rule reads a device value on the host.

>>> import torch
>>> model = torch.nn.Linear(4, 2)
>>> model(torch.randn(8, 4)).pow(2).sum().backward()
>>> stats = GlobalNorm(1.0)(model.parameters())
>>> bool(stats.norm_after <= 1.0 + 1e-6)
True

The rules with published adaptive thresholds live in their own modules:
:mod:`~secateurs.clip.autoclip`, :mod:`~secateurs.clip.zclip`, :mod:`~secateurs.clip.adagc`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from secateurs.clip._tensors import (
    Params,
    as_list,
    check_norm_type,
    clip_coefficient,
    combine_norms,
    constant,
    dense_grads_only,
    has_dtensor,
    is_dense_cpu,
    per_tensor_norms,
    scale_,
    scale_each_,
    total_norm,
    with_grad,
)
from secateurs.clip.functional import _clamp_
from secateurs.clip.registry import register
from secateurs.clip.stats import ClipStats
from secateurs.clip.unitwise import UnitPlan, agc_apply_
from secateurs.errors import SecateursError, check, check_optional_bool, check_positive

__all__ = ["AGC", "Chain", "GlobalNorm", "Norm", "Rule", "StatefulRule", "Value"]


class Rule:
    """Base class of clipping rules.

    Subclasses implement :meth:`clip`, which receives the full parameter list (parameters
    without a gradient included, so per-parameter state can be indexed by position) and must
    not read device values on the host.
    """

    method: ClassVar[str] = ""
    """Registry name (set by ``@register``)."""

    def __call__(self, params: Params) -> ClipStats:
        """Clip the gradients of ``params`` in place and return what was done."""
        params = as_list(params)
        with torch.no_grad():
            if not any(p.grad is not None for p in params):
                device = params[0].device if params else torch.device("cpu")
                return ClipStats.unclipped(torch.zeros((), device=device))
            with dense_grads_only(params):
                return self.clip(params)

    def clip(self, params: list[Tensor]) -> ClipStats:
        """Clip; ``params`` is a list where at least one tensor has a ``.grad``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The rule's running state (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        stateless = f"{{}} ({type(self).__name__} keeps no state)"
        check(not state_dict, "state_dict", sorted(state_dict), stateless)

    def _fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"


class StatefulRule(Rule):
    """A rule whose state is a dict of tensors created on first use on the grads' device."""

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}

    def _fresh_state(self, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        # made outside inference mode, so a first call under torch.inference_mode() leaves
        # state that later calls outside it can still update in place
        if not self._state:
            with torch.inference_mode(False):
                self._state = self._fresh_state(device)
        elif next(iter(self._state.values())).device != device:
            with torch.inference_mode(False):
                self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self._state.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:
            self._state = {}
            return
        template = self._fresh_state(torch.device("meta"))
        field = "state_dict"
        check(set(state_dict) == set(template), field, sorted(state_dict), str(sorted(template)))
        state: dict[str, Tensor] = {}
        for key, like in template.items():
            value = state_dict[key]
            ok = isinstance(value, Tensor) and (like.dim() == 0) == (value.dim() == 0)
            check(ok, f"{field}[{key!r}]", type(value).__name__, "a tensor saved by this rule")
            self._check_loaded(key, value, like)
            with torch.inference_mode(False):
                state[key] = value.detach().clone().to(like.dtype)
        self._state = state

    def _settings(self) -> tuple[tuple[str, Any], ...]:
        """The constructor settings, hashable (a CUDA graph of the update depends on them)."""
        return tuple(self._fields().items())

    def _check_loaded(self, key: str, value: Tensor, like: Tensor) -> None:
        """Raise if ``value`` cannot replace ``like`` (shape mismatch by default)."""
        field = f"state_dict[{key!r}]"
        check(value.shape == like.shape, field, tuple(value.shape), f"shape {tuple(like.shape)}")


@register("value")
class Value(Rule):
    """Clamp every gradient element into ``[-clip_value, clip_value]``.

    ``threshold`` in the stats is ``clip_value`` (an element bound, not a norm).
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_positive(clip_value, "clip_value")

    def clip(self, params: list[Tensor]) -> ClipStats:
        _, grads = with_grad(params)
        before = total_norm(grads)
        largest = total_norm(grads, math.inf)
        _clamp_(grads, -self.clip_value, self.clip_value)
        return ClipStats(
            norm_before=before,
            norm_after=total_norm(grads),
            threshold=constant(self.clip_value, before.device),
            clipped=largest > self.clip_value,
        )

    def _fields(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}


@register("norm")
class Norm(Rule):
    """Clip each gradient tensor on its own to p-norm ``max_norm``.

    Stats: totals over all tensors; ``threshold`` is ``max_norm`` (the per-tensor bound).
    """

    def __init__(self, max_norm: float, *, norm_type: float | str = 2.0) -> None:
        self.max_norm = check_positive(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)

    def clip(self, params: list[Tensor]) -> ClipStats:
        _, grads = with_grad(params)
        norms = per_tensor_norms(grads, self.norm_type)
        coef = clip_coefficient(norms, self.max_norm)
        scale_each_(grads, list(coef.unbind()))
        return ClipStats(
            norm_before=combine_norms(norms, self.norm_type),
            norm_after=combine_norms(norms * coef, self.norm_type),
            threshold=constant(self.max_norm, norms.device),
            clipped=(coef < 1.0).any(),
        )

    def _fields(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}


@register("global_norm")
class GlobalNorm(Rule):
    """Scale all gradients together so their joint p-norm is at most ``max_norm``.

    The factor is the one :func:`torch.nn.utils.clip_grad_norm_` uses,
    ``min(max_norm / (norm + 1e-6), 1)``, applied even when it is 1 (deciding to skip it would
    need a host read).
    """

    def __init__(self, max_norm: float, *, norm_type: float | str = 2.0) -> None:
        self.max_norm = check_positive(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)

    def clip(self, params: list[Tensor]) -> ClipStats:
        _, grads = with_grad(params)
        cpu = is_dense_cpu(grads)
        norm = total_norm(grads, self.norm_type, cpu=cpu)
        coef = clip_coefficient(norm, self.max_norm)
        scale_(grads, coef, cpu=cpu)
        return ClipStats(
            norm_before=norm,
            norm_after=norm * coef,
            threshold=constant(self.max_norm, norm.device),
            clipped=coef < 1.0,
        )

    def _fields(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}


@register("agc")
class AGC(Rule):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021); defaults from the paper.

    See :func:`secateurs.clip.agc_` and :mod:`secateurs.clip.unitwise` for what a unit is, and
    for ``fused`` (one Triton kernel on CUDA: None picks it where it pays, True always, False
    never).
    ``threshold`` in the stats is the 2-norm of the per-unit bounds.

    The rule keeps the :class:`~secateurs.clip.unitwise.UnitPlan` of the last gradients it saw
    (their layout, with buffers for stacking the small ones) and reuses it while it fits the
    parameters (see :meth:`~secateurs.clip.unitwise.UnitPlan.fits`); it is rebuilt when they
    change and is not part of the state dict.
    """

    def __init__(
        self, clipping: float = 0.01, *, eps: float = 1e-3, fused: bool | None = None
    ) -> None:
        self.clipping = check_positive(clipping, "clipping")
        self.eps = check_positive(eps, "eps")
        self.fused = check_optional_bool(fused, "fused")
        self._plan: UnitPlan | None = None

    def clip(self, params: list[Tensor]) -> ClipStats:
        kept, grads = with_grad(params)
        if has_dtensor(grads):  # FSDP2 shards: unit by unit in DTensor ops, no plan
            r = agc_apply_(kept, grads, self.clipping, self.eps)
            return ClipStats(r.grad_norm, r.clipped_norm, r.threshold, r.clipped)
        if self._plan is None or not self._plan.fits(kept, grads):
            self._plan = UnitPlan(grads, kept, fused=self.fused)
        r = agc_apply_(kept, grads, self.clipping, self.eps, self._plan)
        return ClipStats(r.grad_norm, r.clipped_norm, r.threshold, r.clipped)

    def _fields(self) -> dict[str, Any]:
        fields = {"clipping": self.clipping, "eps": self.eps}
        return fields if self.fused is None else {**fields, "fused": self.fused}


class Chain(Rule):
    """Apply rules in order, e.g. ``Chain(AGC(), GlobalNorm(1.0))``.

    Stats: ``norm_before`` of the first rule, ``norm_after`` and ``threshold`` of the last,
    ``clipped`` if any rule clipped. The state dict nests each rule's under its position.
    """

    def __init__(self, *rules: Rule) -> None:
        check(len(rules) > 0, "rules", rules, "one or more rules")
        for i, r in enumerate(rules):
            check(isinstance(r, Rule), f"rules[{i}]", r, "a secateurs.clip rule")
        self.rules: tuple[Rule, ...] = rules

    def clip(self, params: list[Tensor]) -> ClipStats:
        stats = [rule.clip(params) for rule in self.rules]
        device = stats[0].norm_before.device
        clipped = torch.stack([s.clipped.to(device) for s in stats]).any()
        return ClipStats(stats[0].norm_before, stats[-1].norm_after, stats[-1].threshold, clipped)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): r.state_dict() for i, r in enumerate(self.rules)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        expected = [str(i) for i in range(len(self.rules))]
        check(set(state_dict) == set(expected), "state_dict", sorted(state_dict), f"keys {expected}")
        for i, r in enumerate(self.rules):
            try:
                r.load_state_dict(state_dict[str(i)])
            except SecateursError as err:  # name the entry: state_dict['1']['count']
                if err.field is None or not err.field.startswith("state_dict"):
                    raise
                field = f"state_dict[{str(i)!r}]{err.field.removeprefix('state_dict')}"
                raise SecateursError(field + str(err)[len(err.field) :], field=field) from None

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.rules))})"
