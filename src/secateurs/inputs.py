"""Model inputs the way users hold them: a tensor, a tuple of positional inputs, or a mapping.

A mapping is spread as keyword arguments, so a tokenizer's ``BatchEncoding`` (a ``Mapping``
that is not a ``dict``), a ``UserDict`` or a plain dict all work wherever secateurs takes
example inputs or batches. Model outputs may be tensors, tuples, mappings or dataclass-like
objects (a Hugging Face ``ModelOutput``); :func:`tensors_of` finds the tensors in any of them.

>>> import torch
>>> from collections import UserDict
>>> net = torch.nn.Bilinear(2, 3, 1)
>>> forward(net, UserDict(input1=torch.ones(1, 2), input2=torch.ones(1, 3))).shape
torch.Size([1, 1])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from secateurs.errors import SecateursError

__all__ = ["forward", "pairs", "plain", "tensors_of", "to_device"]


def forward(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a mapping is spread as keywords, a tuple/list as positional inputs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def plain(inputs: Any) -> Any:
    """``inputs`` with a mapping turned into a plain ``dict``, for code that spreads only dicts
    as keywords (Torch-Pruning's graph and op counter)."""
    return dict(inputs) if isinstance(inputs, Mapping) and not isinstance(inputs, dict) else inputs


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it moved to ``device`` (tuples, lists and mappings walked;
    a mapping comes back as a dict, which :func:`forward` spreads the same way)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value``, in order: tensors, tuples, lists, mappings and dataclasses
    (a Hugging Face ``ModelOutput`` is both a mapping and a dataclass) are walked."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, tuple | list):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        return []
    return [t for item in items for t in tensors_of(item)]


def pairs(batches: Iterable[Any], max_batches: int | None = None, *, field: str = "batches") -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` from each batch, at most ``max_batches`` of them, at least one.

    A batch is an ``(inputs, targets)`` pair, or a mapping of keyword inputs (a tokenizer's
    output: its targets are then None, and a loss function reads what it needs from the
    model's output).
    """
    seen = 0
    for batch in batches:
        if max_batches is not None and seen >= max_batches:
            break
        if isinstance(batch, Mapping):
            inputs, targets = batch, None
        elif isinstance(batch, tuple | list) and len(batch) == 2:
            inputs, targets = batch
        else:
            raise SecateursError(
                f"{field}: got an item of type {type(batch).__name__}; allowed: (inputs, targets) "
                "pairs or mappings of keyword inputs"
            )
        seen += 1
        yield inputs, targets
    if seen == 0:
        raise SecateursError(f"{field}: got no batch; allowed: an iterable of at least one (inputs, targets) pair")
