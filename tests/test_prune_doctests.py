"""The examples in the docstrings of secateurs.prune run and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["", ".masks", ".criteria", ".selection", ".pruner", ".schedules", ".checkpoint", ".report", ".activations"]


@pytest.mark.parametrize("suffix", MODULES)
def test_docstring_examples_run(suffix):
    module = importlib.import_module("secateurs.prune" + suffix)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
