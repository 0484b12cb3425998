"""The examples in the docstrings of secateurs.prune run and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "", ".masks", ".criteria", ".selection", ".pruner", ".schedules", ".checkpoint", ".report", ".activations",
    ".surgery", ".surgery.cut", ".surgery.graph", ".surgery.select", ".surgery.criteria", ".surgery.checkpoint",
]
SHARED = ["secateurs.errors", "secateurs.registry", "secateurs.inputs"]


@pytest.mark.parametrize("name", ["secateurs.prune" + suffix for suffix in MODULES] + SHARED)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
