"""Constructor checks shared by the Keras rules (the messages of :mod:`secateurs.clip`'s)."""

from __future__ import annotations

from secateurs.errors import check


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_open_unit(value: object, field: str, *, closed_low: bool = False) -> float:
    """A number in (0, 1), or [0, 1) with ``closed_low``."""
    ok = _number(value) and (value >= 0 if closed_low else value > 0) and value < 1  # type: ignore[operator]
    check(ok, field, value, "a number in [0, 1)" if closed_low else "a number in (0, 1)")
    return float(value)  # type: ignore[arg-type]


def check_steps(value: object, field: str) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    check(ok, field, value, "an integer >= 1")
    return value  # type: ignore[return-value]
