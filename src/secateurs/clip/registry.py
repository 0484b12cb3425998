"""Name -> rule class, so a config (or the CLI) can build any rule from a method name.

Adding a rule is one ``@register("name")`` on its class; :func:`build` validates parameter
names against the constructor before calling it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from secateurs.errors import SecateursError, check

if TYPE_CHECKING:
    from secateurs.clip.rules import Rule

_RULES: dict[str, type[Rule]] = {}
R = TypeVar("R", bound="type[Rule]")


def register(name: str) -> Callable[[R], R]:
    """Class decorator: make the rule buildable as ``build(name, ...)``."""

    def add(cls: R) -> R:
        if name in _RULES:
            raise ValueError(f"clip method {name!r} registered twice")
        _RULES[name] = cls
        cls.method = name  # type: ignore[attr-defined]
        return cls

    return add


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_RULES)


def _parameters(cls: type[Rule]) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def build(method: str, **params: Any) -> Rule | None:
    """Build the rule called ``method`` with keyword ``params``; ``"none"`` gives None.

    Raises :class:`~secateurs.errors.SecateursError` naming the field for an unknown method,
    an unknown or missing parameter, or a bad value.

    >>> build("global_norm", max_norm=1.0)
    GlobalNorm(max_norm=1.0, norm_type=2.0)
    >>> build("none") is None
    True
    """
    allowed = ", ".join(("none", *_RULES))
    check(
        isinstance(method, str) and (method == "none" or method in _RULES),
        "clip.method",
        method,
        allowed,
    )
    if method == "none":
        for name, value in params.items():
            check(False, f"clip.{name}", value, "no parameters with method 'none'")
        return None
    cls = _RULES[method]
    accepted = _parameters(cls)
    names_ = ", ".join(accepted) or "none"
    for name, value in params.items():
        check(name in accepted, f"clip.{name}", value, f"parameters of {method!r}: {names_}")
    for name, p in accepted.items():
        required = p.default is inspect.Parameter.empty
        check(
            not required or name in params, f"clip.{name}", None, f"required by method {method!r}"
        )
    try:
        return cls(**params)
    except SecateursError as err:
        raise SecateursError(f"clip.{err}") from None


def parameters(method: str) -> dict[str, Any]:
    """Parameter names of ``method`` with their defaults (``inspect.Parameter.empty`` if required)."""
    check(method in _RULES, "clip.method", method, ", ".join(_RULES))
    return {n: p.default for n, p in _parameters(_RULES[method]).items()}
