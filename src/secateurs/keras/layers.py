"""Which weights of which Keras layers can be pruned: one registry, like TFMOT's ``prune_registry``.

Each entry maps a layer class to the attribute names of its prunable weights, and the axis its
N:M groups run along (the input axis: the one the layer's dot products reduce over). Layers that
hold other layers are walked into (a ``MultiHeadAttention``'s projections are ``EinsumDense``
layers; an ``LSTM``'s weights are its cell's), so the registry only names the leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from secateurs.errors import check

__all__ = ["PRUNABLE", "Target", "prunable_targets", "register_layer"]


@dataclass(frozen=True)
class LayerWeights:
    attrs: tuple[str, ...]
    group_axis: int  # the input axis of the kernel, for N:M groups


PRUNABLE: dict[type, LayerWeights] = {}
"""Layer class -> its prunable weight attributes (subclasses match too)."""


def register_layer(cls: type, *attrs: str, group_axis: int = -2) -> None:
    """Declare ``attrs`` of layers of type ``cls`` prunable (``group_axis``: their input axis)."""
    PRUNABLE[cls] = LayerWeights(tuple(attrs), group_axis)


L = keras.layers
register_layer(L.Dense, "kernel")
register_layer(L.EinsumDense, "kernel", group_axis=0)
for _conv in (L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose):
    register_layer(_conv, "kernel")
register_layer(L.DepthwiseConv2D, "kernel", group_axis=0)
register_layer(L.DepthwiseConv1D, "kernel", group_axis=0)
register_layer(L.SeparableConv2D, "depthwise_kernel", "pointwise_kernel")
for _cell in (L.SimpleRNNCell, L.LSTMCell, L.GRUCell):
    register_layer(_cell, "kernel", "recurrent_kernel")
register_layer(L.Embedding, "embeddings", group_axis=-1)

_CONTAINERS = (L.MultiHeadAttention, L.RNN, L.Bidirectional, L.TimeDistributed, keras.Model)


@dataclass(frozen=True)
class Target:
    """One prunable weight: the leaf layer that owns it and the variable."""

    layer: Any
    variable: Any
    group_axis: int

    @property
    def name(self) -> str:
        return self.variable.path


def _entry(layer: Any) -> LayerWeights | None:
    for cls in type(layer).__mro__:
        if cls in PRUNABLE:
            return PRUNABLE[cls]
    return None


def _leaves(layer: Any) -> list[Any]:
    """``layer`` if it is prunable, else the prunable layers inside it (depth first)."""
    if _entry(layer) is not None:
        return [layer]
    found: list[Any] = []
    for child in layer._flatten_layers(include_self=False, recursive=False):
        found.extend(_leaves(child))
    return found


def _allowed() -> str:
    names = sorted({cls.__name__ for cls in PRUNABLE} | {"MultiHeadAttention", "LSTM", "GRU", "SimpleRNN"})
    return "a built layer of the model holding prunable weights: " + ", ".join(names)


def prunable_targets(model: Any, layers: Any = None, *, field: str = "layers") -> list[Target]:
    """The prunable weights of ``layers`` (layer objects or names; default: the whole model).

    A layer given explicitly that holds no prunable weight is an error naming its position.
    """
    trainable = {id(v) for v in model.trainable_variables}
    if layers is None:
        chosen = _leaves(model)
        check(bool(chosen), "model", getattr(model, "name", model), _allowed())
    else:
        chosen = []
        for i, item in enumerate(layers):
            layer = item
            if isinstance(item, str):
                try:
                    layer = model.get_layer(item)
                except ValueError:
                    check(False, f"{field}[{i}]", item, "the name of a layer of the model")
            leaves = _leaves(layer) if isinstance(layer, keras.layers.Layer) else []
            what = f"{type(layer).__name__} {getattr(layer, 'name', '')!r}".strip()
            check(bool(leaves), f"{field}[{i}]", what, _allowed())
            chosen.extend(leaves)
    targets, seen = [], set()
    for layer in chosen:
        entry = _entry(layer)
        assert entry is not None
        for attr in entry.attrs:
            v = getattr(layer, attr, None)
            if v is None or id(v) in seen or id(v) not in trainable:
                continue
            seen.add(id(v))
            targets.append(Target(layer, v, entry.group_axis))
    check(bool(targets), field, layers, "layers with trainable prunable weights (is the model built?)")
    return targets
