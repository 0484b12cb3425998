"""The one exception type a user can cause, and the one set of helpers that raise it.

Every check names the *Python argument* it was given (``max_norm``, ``sparsity``); the config
layer and the CLI re-raise under their own key names with :func:`config_keys`, so a library user
reads ``max_norm: got -1.0; allowed: a number > 0`` and a CLI user ``clip.max_norm: got -1.0; ...``.

>>> check_fraction(0.5, "sparsity")
0.5
>>> try:
...     with config_keys("prune."):
...         check_fraction(1.5, "sparsity")
... except SecateursError as err:
...     print(err)
prune.sparsity: got 1.5; allowed: a number in [0, 1)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

__all__ = [
    "SecateursError",
    "check",
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_optional_bool",
    "check_positive",
    "config_keys",
]


class SecateursError(ValueError):
    """Bad input from the user: a config value, an argument, a file.

    The message starts with the field (the argument, or the config key once re-raised by
    :func:`config_keys`), then the bad value and what is allowed. The CLI prints it as one line
    on stderr and exits with code 2.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        found = _FIELD.match(message)
        self.field: str | None = field or (found.group(1) if found else None)
        """The argument or key the message starts with (None when it names none)."""


_FIELD = re.compile(r"([A-Za-z_][\w.\[\]'\"-]*|--[\w-]+): ")


def check(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise :class:`SecateursError` naming ``field``, ``value`` and ``allowed`` unless ``condition``."""
    if not condition:
        raise SecateursError(f"{field}: got {value!r}; allowed: {allowed}", field=field)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_fraction(
    value: object, field: str, *, low_open: bool = False, high_open: bool = True, high: float = 1.0
) -> float:
    """``value`` as a float in [0, ``high``) (each end open or closed as asked), else an error.

    >>> check_fraction(1.0, "max_layer_sparsity", low_open=True, high_open=False)
    1.0
    """
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"a number in {lo}0, {high:g}{hi}"
    check(_is_number(value) and not math.isnan(float(value)), field, value, allowed)  # type: ignore[arg-type]
    v = float(value)  # type: ignore[arg-type]
    ok = (v > 0 if low_open else v >= 0) and (v < high if high_open else v <= high)
    check(ok, field, value, allowed)
    return v


def check_int(value: object, field: str, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else an error."""
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    check(ok, field, value, allowed)
    return value  # type: ignore[return-value]


def check_positive(value: object, field: str) -> float:
    """``value`` as a float > 0 (``inf`` allowed), else an error."""
    check(_is_number(value) and value > 0, field, value, "a number > 0")  # type: ignore[operator]
    return float(value)  # type: ignore[arg-type]


def check_bool(value: object, field: str) -> bool:
    """``value`` if it is True or False, else an error."""
    check(isinstance(value, bool), field, value, "True or False")
    return value  # type: ignore[return-value]


def check_optional_bool(value: object, field: str) -> bool | None:
    """``value`` if it is True, False or None, else an error."""
    check(value is None or isinstance(value, bool), field, value, "True, False or None")
    return value  # type: ignore[return-value]


def check_choice(value: object, field: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else an error listing them."""
    options = tuple(choices)
    check(isinstance(value, str) and value in options, field, value, ", ".join(options))
    return value  # type: ignore[return-value]


@contextmanager
def config_keys(prefix: str, names: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a library :class:`SecateursError` under the config key of its argument.

    The argument ``arg`` becomes ``names[arg]`` when given there, else ``prefix + arg``
    (``"max_norm"`` -> ``"clip.max_norm"``). Used by the config layer, never by the library.
    """
    try:
        yield
    except SecateursError as err:
        field = err.field
        message = str(err)
        if field is None or not message.startswith(field):
            raise
        root, sep, rest = field.partition("[")
        key = (names or {}).get(root, prefix + root) + sep + rest
        raise SecateursError(key + message[len(field):], field=key) from None
