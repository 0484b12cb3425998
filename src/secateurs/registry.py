"""Name -> class, one shape for clip rules, mask criteria and group criteria.

A :class:`Registry` is a read-only mapping of the registered names to their classes, in
registration order, that always shows what is registered *now* (a user's own entries included):
``prune.CRITERIA``, ``prune.GROUP_CRITERIA`` and ``clip.RULES`` are registries, and the CLI's
``--help`` lists them when it is shown. Registering a taken name is an error unless
``replace=True``.

>>> from secateurs.registry import Registry
>>> shapes = Registry("shape", field="kind")
>>> @shapes.register("square")
... class Square:
...     def __init__(self, side: float = 1.0):
...         self.side = side
>>> list(shapes), shapes.build("square", side=2.0).side
(['square'], 2.0)
>>> shapes.build("circle")
Traceback (most recent call last):
...
secateurs.registry.UnknownName: kind: got 'circle'; allowed: square
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from secateurs.errors import SecateursError, check

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")
C = TypeVar("C", bound=type)


class UnknownName(SecateursError, KeyError):
    """A name no class is registered under: a :class:`SecateursError` naming the field, and a
    ``KeyError``, so ``registry.get(name)`` and ``name in registry`` work as for any mapping."""

    __str__ = SecateursError.__str__  # KeyError would quote the message


class Registry(Mapping[str, type[T]], Generic[T]):
    """Registered classes by name.

    ``field`` is the argument that names one (for errors); each registered class gets its name
    as the attribute ``attr``.
    """

    def __init__(self, kind: str, *, field: str, attr: str = "name"):
        self.kind = kind
        self.field = field
        self.attr = attr
        self._classes: dict[str, type[T]] = {}

    # -- the mapping -------------------------------------------------------------------------

    def __getitem__(self, name: str) -> type[T]:
        if not (isinstance(name, str) and name in self._classes):
            raise UnknownName(f"{self.field}: got {name!r}; allowed: {', '.join(self._classes)}", field=self.field)
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._classes)})"

    # -- adding and building -----------------------------------------------------------------

    def register(self, name: str, *, replace: bool = False) -> Callable[[C], C]:
        """Class decorator: make the class buildable as ``build(name, ...)``.

        The class gets ``name`` as its ``attr`` attribute. A name already taken is an error
        unless ``replace=True`` (then the new class wins).
        """
        check(isinstance(name, str) and bool(name.strip()), "name", name, f"a non-empty {self.kind} name")

        def add(cls: C) -> C:
            if name in self._classes and not replace and self._classes[name] is not cls:
                raise SecateursError(
                    f"name: got {name!r}, already registered as a {self.kind} by "
                    f"{self._classes[name].__qualname__}; allowed: a new name, or register(..., replace=True)",
                    field="name",
                )
            self._classes[name] = cls
            setattr(cls, self.attr, name)
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins that clean up after themselves)."""
        self[name]
        del self._classes[name]

    def parameters(self, name: str) -> dict[str, Any]:
        """Constructor parameters of ``name`` with their defaults (``inspect.Parameter.empty`` if required)."""
        return {n: p.default for n, p in _parameters(self[name]).items()}

    def build(self, name: str, **options: Any) -> T:
        """An instance of ``name`` built with keyword ``options``, each checked against its signature."""
        cls = self[name]
        accepted = _parameters(cls)
        listed = ", ".join(accepted) or "none"
        for option, value in options.items():
            check(option in accepted, option, value, f"parameters of {self.kind} {name!r}: {listed}")
        for option, p in accepted.items():
            required = p.default is inspect.Parameter.empty
            check(not required or option in options, option, None, f"a value: required by {self.kind} {name!r}")
        return cls(**options)


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
