"""The one exception type a user can cause."""

from __future__ import annotations


class SecateursError(ValueError):
    """Bad input from the user: a config value, an argument, a file.

    The message names the field, the bad value and what is allowed. The CLI prints it as one
    line on stderr and exits with code 2.
    """


def check(condition: bool, field: str, value: object, allowed: str) -> None:
    """Raise :class:`SecateursError` naming ``field``, ``value`` and ``allowed`` unless ``condition``."""
    if not condition:
        raise SecateursError(f"{field}: got {value!r}; allowed: {allowed}")
