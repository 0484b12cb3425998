"""Clipping rules for Keras 3, in ``keras.ops``: the names and arguments of :mod:`secateurs.clip`.

A rule gets the gradients and their variables inside the optimizer step and returns the
clipped gradients with a :class:`~secateurs.keras.stats.ClipStats`. A stateful rule creates its
state in :meth:`Rule.build` through ``optimizer.add_variable`` (so the state is an optimizer
variable: saved with the model, and carried through ``stateless_apply`` under ``jax.jit``) and
updates it with ``.assign``. Rules run through :func:`secateurs.keras.wrap`::

    opt = secateurs.keras.wrap(keras.optimizers.AdamW(1e-3), secateurs.keras.GlobalNorm(1.0))

The adaptive rules live in their own modules: :mod:`~secateurs.keras.autoclip`,
:mod:`~secateurs.keras.zclip`, :mod:`~secateurs.keras.adagc`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from keras import ops

from secateurs.errors import check, check_positive
from secateurs.keras import _ops
from secateurs.keras.stats import ClipStats
from secateurs.registry import Registry

__all__ = [
    "AGC", "RULES", "Chain", "GlobalNorm", "Norm", "Rule", "Value", "build_rule", "deserialize_rule",
    "register", "serialize_rule",
]  # fmt: skip

RULES: Registry[Rule] = Registry("keras clip rule", field="rule", attr="method")
"""Name -> Keras rule class; the same names as :data:`secateurs.clip.RULES`."""

R = TypeVar("R", bound=type)


def register(name: str, *, replace: bool = False) -> Callable[[R], R]:
    """Class decorator: make a Keras rule buildable by name (``build_rule(name, ...)``)."""
    return RULES.register(name, replace=replace)


class Rule:
    """Base class of the Keras clipping rules.

    Subclasses implement :meth:`clip`; stateful ones also :meth:`build`. ``get_config()`` (the
    constructor arguments) is what the optimizer saves (:func:`serialize_rule`), so a rule is
    rebuilt by ``RULES.build(rule.method, **rule.get_config())`` (:func:`deserialize_rule`).
    """

    method: ClassVar[str] = ""

    def build(self, optimizer: Any, variables: Sequence[Any]) -> None:
        """Create the rule's state with ``optimizer.add_variable`` (stateless rules: nothing)."""

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        """The clipped ``grads`` and what was done; ``variables[i]`` is the one ``grads[i]`` updates."""
        raise NotImplementedError

    def state_variables(self) -> list[Any]:
        """The Keras variables holding the rule's state (empty for stateless rules)."""
        return []

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def build_rule(rule: Rule | str | None, field: str = "rule") -> Rule | None:
    """``rule`` itself, or the rule registered as ``rule`` built with its defaults."""
    if rule is None or isinstance(rule, Rule):
        return rule
    check(isinstance(rule, str) and rule in RULES, field, rule, "a secateurs.keras rule, None or " + ", ".join(RULES))
    return RULES.build(rule)  # type: ignore[arg-type]


@register("value")
class Value(Rule):
    """Clamp every gradient element into ``[-clip_value, clip_value]`` (Keras' ``clipvalue``)."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_positive(clip_value, "clip_value")

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        v = self.clip_value
        before = _ops.total_norm(grads)
        largest = _ops.total_norm(grads, math.inf)
        out = [ops.clip(g, -v, v) for g in grads]
        threshold = ops.convert_to_tensor(v, "float32")
        clipped = ops.cast(largest > v, "float32")
        return out, ClipStats(before, _ops.total_norm(out), threshold, clipped)

    def get_config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}


@register("norm")
class Norm(Rule):
    """Clip each gradient tensor on its own to p-norm ``max_norm`` (Keras' ``clipnorm``, any p)."""

    def __init__(self, max_norm: float, *, norm_type: float | str = 2.0) -> None:
        self.max_norm = check_positive(max_norm, "max_norm")
        self.norm_type = _ops.check_norm_type(norm_type)

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        p = self.norm_type
        norms = _ops.tensor_norms(grads, p)
        coef = _ops.coefficient(norms, self.max_norm)
        out = [g * ops.cast(coef[i], g.dtype) for i, g in enumerate(grads)]
        stats = ClipStats(
            norm_before=_ops.combine(norms, p),
            norm_after=_ops.combine(norms * coef, p),
            threshold=ops.convert_to_tensor(self.max_norm, "float32"),
            clipped=ops.cast(ops.any(coef < 1.0), "float32"),
        )
        return out, stats

    def get_config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}


@register("global_norm")
class GlobalNorm(Rule):
    """Scale all gradients together so their joint p-norm is at most ``max_norm``.

    For p = 2 this is Keras' ``global_clipnorm`` up to the 1e-6 in torch's factor
    ``min(max_norm / (norm + 1e-6), 1)``, which is the one used here. A non-finite norm makes
    the factor NaN (as in Keras and torch), for the optimizer's ``nonfinite`` policy to act on.
    """

    def __init__(self, max_norm: float, *, norm_type: float | str = 2.0) -> None:
        self.max_norm = check_positive(max_norm, "max_norm")
        self.norm_type = _ops.check_norm_type(norm_type)

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        norm = _ops.total_norm(grads, self.norm_type)
        coef = _ops.coefficient(norm, self.max_norm)
        stats = ClipStats(
            norm_before=norm,
            norm_after=norm * coef,
            threshold=ops.convert_to_tensor(self.max_norm, "float32"),
            clipped=ops.cast(coef < 1.0, "float32"),
        )
        return _ops.scale(grads, coef), stats

    def get_config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}


def unit_norms(x: Any) -> Any:
    """2-norms of the output units of a Keras weight: over every axis but the last.

    Keras kernels keep the output axis last (Dense ``[in, out]``, Conv2D ``[kh, kw, in, out]``),
    as NFNets' JAX ``unitwise_norm`` assumes; a tensor with ``ndim <= 1`` is one unit.
    """
    x = _ops.f32(x)
    if len(x.shape) <= 1:
        return ops.sqrt(ops.sum(ops.square(x)))
    return ops.sqrt(ops.sum(ops.square(x), axis=tuple(range(len(x.shape) - 1)), keepdims=True))


@register("agc")
class AGC(Rule):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021); defaults from the paper.

    A unit's gradient is scaled to ``clipping * max(||W_u||, eps)`` when its norm exceeds that
    bound; units are the output units (the last axis of a Keras kernel, see :func:`unit_norms`).
    ``threshold`` in the stats is the 2-norm of the per-unit bounds, as in
    :class:`secateurs.clip.AGC`.
    """

    def __init__(self, clipping: float = 0.01, *, eps: float = 1e-3) -> None:
        self.clipping = check_positive(clipping, "clipping")
        self.eps = check_positive(eps, "eps")

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        out, before, after, bounds, clipped = [], [], [], [], []
        for g, w in zip(grads, variables, strict=True):
            gn = unit_norms(g)
            bound = self.clipping * ops.maximum(unit_norms(w), self.eps)
            factor = ops.where(gn > bound, bound / ops.maximum(gn, _ops.EPS), 1.0)
            out.append(g * ops.cast(factor, g.dtype))
            before.append(ops.sum(ops.square(gn)))
            after.append(ops.sum(ops.square(gn * factor)))
            bounds.append(ops.sum(ops.square(bound)))
            clipped.append(ops.any(factor < 1.0))
        stats = ClipStats(
            _root_sum(before), _root_sum(after), _root_sum(bounds),
            ops.cast(ops.any(ops.stack(clipped)), "float32"),
        )
        return out, stats

    def get_config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}


def _root_sum(squares: list[Any]) -> Any:
    return ops.sqrt(ops.sum(ops.stack(squares)))


class Chain(Rule):
    """Apply rules in order, e.g. ``Chain(AGC(), GlobalNorm(1.0))``: :class:`secateurs.clip.Chain`.

    Each rule clips what the one before it returned. Stats: ``norm_before`` of the first rule,
    ``norm_after`` and ``threshold`` of the last, ``clipped`` if any rule clipped. The state
    variables are those of every rule, in order. Not a registered name (as in
    :mod:`secateurs.clip`): build it from rules.
    """

    method: ClassVar[str] = "chain"

    def __init__(self, *rules: Rule) -> None:
        check(len(rules) > 0, "rules", rules, "one or more rules")
        for i, r in enumerate(rules):
            check(isinstance(r, Rule), f"rules[{i}]", r, "a secateurs.keras rule")
        self.rules: tuple[Rule, ...] = rules

    def build(self, optimizer: Any, variables: Sequence[Any]) -> None:
        for rule in self.rules:
            rule.build(optimizer, variables)

    def state_variables(self) -> list[Any]:
        return [v for rule in self.rules for v in rule.state_variables()]

    def clip(self, grads: list[Any], variables: list[Any]) -> tuple[list[Any], ClipStats]:
        stats = []
        for rule in self.rules:
            grads, s = rule.clip(grads, variables)
            stats.append(s)
        clipped = ops.max(ops.stack([ops.cast(s.clipped, "float32") for s in stats]))
        return grads, ClipStats(stats[0].norm_before, stats[-1].norm_after, stats[-1].threshold, clipped)

    def get_config(self) -> dict[str, Any]:
        return {"rules": [serialize_rule(r) for r in self.rules]}

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.rules))})"


def serialize_rule(rule: Rule | None) -> dict[str, Any] | None:
    """``{"method": ..., "config": ...}``, what a saved optimizer records of its rule."""
    return None if rule is None else {"method": rule.method, "config": rule.get_config()}


def deserialize_rule(config: dict[str, Any] | None) -> Rule | None:
    """The rule :func:`serialize_rule` described (a :class:`Chain` with its rules)."""
    if config is None:
        return None
    if config["method"] == Chain.method:
        return Chain(*(deserialize_rule(r) for r in config["config"]["rules"]))
    return RULES.build(config["method"], **config["config"])
