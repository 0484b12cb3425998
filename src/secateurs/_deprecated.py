"""Old argument names kept for one release (0.2), each with a DeprecationWarning."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from secateurs.errors import SecateursError

REMOVED_IN = "0.3"


def renamed_arguments(function: str, legacy: Mapping[str, Any], names: Mapping[str, str], given: Mapping[str, Any]) -> dict[str, Any]:
    """The new names of the ``legacy`` keyword arguments ``function`` was called with.

    ``names`` maps old -> new; ``given`` holds the new-named arguments as the caller passed them
    (None when not passed), so passing both spellings is refused. Warns once per old name used.
    """
    out: dict[str, Any] = {}
    for old, value in legacy.items():
        if old not in names:
            raise TypeError(f"{function}() got an unexpected keyword argument {old!r}")
        new = names[old]
        if given.get(new) is not None:
            raise SecateursError(f"{old}: got {value!r} beside {new}={given[new]!r}; allowed: {new} alone ({old} is its old name)", field=old)
        warnings.warn(
            f"{function}({old}=...) is deprecated and will be removed in secateurs {REMOVED_IN}; use {new}=...",
            DeprecationWarning,
            stacklevel=3,
        )
        out[new] = value
    return out
