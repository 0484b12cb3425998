"""Method name -> rule class, so a config (or the CLI) can build any rule from a name.

:data:`RULES` is a :class:`~secateurs.registry.Registry`: adding a rule is one
``@register("name")`` on its class (a user's own rule included), and :func:`build` checks the
parameter names against the constructor before calling it. Errors name the Python argument
(``method``, ``max_norm``); the config layer re-raises them under its keys (``clip.max_norm``).

>>> from secateurs.clip.rules import Rule
>>> @register("my_rule")
... class MyRule(Rule):
...     def __init__(self, limit: float = 1.0):
...         self.limit = limit
>>> build("my_rule", limit=2.0).limit, "my_rule" in names()
(2.0, True)
>>> RULES.unregister("my_rule")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from secateurs.errors import check
from secateurs.registry import Registry

if TYPE_CHECKING:
    from secateurs.clip.rules import Rule

__all__ = ["NONE", "RULES", "build", "names", "parameters", "register"]

RULES: Registry[Rule] = Registry("clip rule", field="method", attr="method")
"""Every buildable rule class by method name, in registration order (live: later ones too)."""

NONE = "none"
"""The method name that builds no rule."""

R = TypeVar("R", bound=type)


def register(name: str, *, replace: bool = False) -> Callable[[R], R]:
    """Class decorator: make the rule buildable as ``build(name, ...)``.

    The class gets ``name`` as its ``method`` attribute. A name already taken is a
    :class:`~secateurs.errors.SecateursError` unless ``replace=True``.
    """
    check(name != NONE, "name", name, "any name but 'none' (it builds no rule)")
    return RULES.register(name, replace=replace)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (``"none"`` not included)."""
    return tuple(RULES)


def build(method: str, **params: Any) -> Rule | None:
    """Build the rule called ``method`` with keyword ``params``; ``"none"`` gives None.

    Raises :class:`~secateurs.errors.SecateursError` naming the argument for an unknown method,
    an unknown or missing parameter, or a bad value.

    >>> build("global_norm", max_norm=1.0)
    GlobalNorm(max_norm=1.0, norm_type=2.0)
    >>> build("none") is None
    True
    >>> build("global_norm", max_norm=-1)
    Traceback (most recent call last):
    ...
    secateurs.errors.SecateursError: max_norm: got -1; allowed: a number > 0
    """
    ok = isinstance(method, str) and (method == NONE or method in RULES)
    check(ok, RULES.field, method, ", ".join((NONE, *RULES)))
    if method == NONE:
        for name, value in params.items():
            check(False, name, value, "no parameters with method 'none'")
        return None
    return RULES.build(method, **params)


def parameters(method: str) -> dict[str, Any]:
    """Parameter names of ``method`` with their defaults (``inspect.Parameter.empty`` if required)."""
    return RULES.parameters(method)
