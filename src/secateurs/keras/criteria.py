"""Importance scores of prunable Keras weights: the criteria of :mod:`secateurs.prune`.

==============  =================================================================================
``magnitude``   ``|w|`` (TFMOT's ``prune_low_magnitude``)
``random``      uniform noise (a baseline), seeded
``gradient``    ``mean |dL/dw|`` over the scoring batches (the seeds' gradient pruning)
``taylor``      ``|w * mean dL/dw|`` (first-order loss change; SNIP when scored at init)
``activation``  ``|w| * mean |x|`` with ``x`` the layer's input (the seeds' activation pruning):
                Dense, Conv and DepthwiseConv layers of a Functional or Sequential model
==============  =================================================================================

A criterion scores a list of :class:`~secateurs.keras.layers.Target` and returns numpy
arrays shaped like their weights. The data criteria need ``batches``: an iterable of
``(x, y)`` (``y`` unused by ``activation``); gradients come from each backend's own autodiff
(``tf.GradientTape``, ``jax.grad`` over ``stateless_call``, torch autograd).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import keras
import numpy as np
from keras import backend, ops

from secateurs.errors import check, check_int
from secateurs.keras.layers import Target
from secateurs.registry import Registry

__all__ = ["CRITERIA", "Criterion", "build_criterion"]

CRITERIA: Registry[Criterion] = Registry("keras criterion", field="criterion")


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


class Criterion:
    """Base class: :meth:`scores` of the targets (numpy, shaped like each weight)."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}


def build_criterion(criterion: Criterion | str, field: str = "criterion") -> Criterion:
    if isinstance(criterion, Criterion):
        return criterion
    check(isinstance(criterion, str) and criterion in CRITERIA, field, criterion, ", ".join(CRITERIA))
    return CRITERIA.build(criterion)


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """``|w|``."""

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        return [np.abs(_numpy(t.variable)) for t in targets]


@CRITERIA.register("random")
class Random(Criterion):
    """Uniform noise from ``numpy.random.default_rng(seed)`` (a new draw per pruning step)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int(seed, "seed", minimum=0)
        self._rng = np.random.default_rng(seed)

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        return [self._rng.random(tuple(t.variable.shape)).astype(np.float32) for t in targets]

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def _loss_fn(model: Any) -> Any:
    loss = getattr(model, "loss", None)
    check(loss is not None, "model", getattr(model, "name", model), "a compiled model (the data criteria use its loss)")
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    return lambda y, y_pred: ops.mean(fn(y, y_pred))


def gradients(model: Any, x: Any, y: Any, variables: Sequence[Any]) -> list[np.ndarray]:
    """``dL/dv`` of the model's compiled loss on one batch, for each of ``variables``."""
    loss_fn = _loss_fn(model)
    name = backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return [_numpy(g) for g in tape.gradient(loss, [v.value for v in variables])]
    if name == "torch":
        params = [v.value for v in variables]
        for p in params:
            p.grad = None
        loss_fn(ops.convert_to_tensor(y), model(ops.convert_to_tensor(x), training=False)).backward()
        grads = [p.grad.detach().cpu().numpy().copy() for p in params]
        for p in params:
            p.grad = None
        return grads
    if name == "jax":
        import jax

        trainable = model.trainable_variables
        fixed = [v.value for v in model.non_trainable_variables]

        def loss_of(values: list[Any]) -> Any:
            y_pred, _ = model.stateless_call(values, fixed, x, training=False)
            return loss_fn(y, y_pred)

        grads = jax.grad(loss_of)([v.value for v in trainable])
        index = {id(v): i for i, v in enumerate(trainable)}
        return [np.asarray(grads[index[id(v)]]) for v in variables]
    raise NotImplementedError(f"gradients on the {name} backend")


def _batches(batches: Iterable[Any] | None, name: str, max_batches: int) -> list[tuple[Any, Any]]:
    check(batches is not None, "data", None, f"batches of (x, y) for criterion {name!r}")
    out = []
    for i, batch in enumerate(batches):  # type: ignore[union-attr]
        if i >= max_batches:
            break
        x, y = (batch[0], batch[1]) if isinstance(batch, tuple | list) and len(batch) >= 2 else (batch, None)
        out.append((x, y))
    check(bool(out), "data", batches, f"at least one batch of (x, y) for criterion {name!r}")
    return out


class _GradientStatistic(Criterion):
    needs_data = True

    def __init__(self, max_batches: int = 8) -> None:
        self.max_batches = check_int(max_batches, "max_batches", minimum=1)

    def _mean_grads(self, model: Any, targets: Sequence[Target], batches: Any, absolute: bool) -> list[np.ndarray]:
        data = _batches(batches, self.name, self.max_batches)
        total = [np.zeros(tuple(t.variable.shape), np.float32) for t in targets]
        for x, y in data:
            for acc, g in zip(total, gradients(model, x, y, [t.variable for t in targets]), strict=True):
                acc += np.abs(g) if absolute else g
        return [t / len(data) for t in total]

    def get_config(self) -> dict[str, Any]:
        return {"max_batches": self.max_batches}


@CRITERIA.register("gradient")
class Gradient(_GradientStatistic):
    """``mean |dL/dw|`` over the scoring batches."""

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        return self._mean_grads(model, targets, batches, absolute=True)


@CRITERIA.register("taylor")
class Taylor(_GradientStatistic):
    """``|w * mean dL/dw|``."""

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        grads = self._mean_grads(model, targets, batches, absolute=False)
        return [np.abs(_numpy(t.variable) * g) for t, g in zip(targets, grads, strict=True)]


_ACTIVATION_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


@CRITERIA.register("activation")
class Activation(Criterion):
    """``|w| * mean |x|``, ``x`` the input channel each weight multiplies."""

    needs_data = True

    def __init__(self, max_batches: int = 8) -> None:
        self.max_batches = check_int(max_batches, "max_batches", minimum=1)

    def scores(self, model: Any, targets: Sequence[Target], batches: Iterable[Any] | None = None) -> list[np.ndarray]:
        for t in targets:
            ok = isinstance(t.layer, _ACTIVATION_LAYERS) and t.layer in model.layers
            check(ok, "layers", f"{type(t.layer).__name__} {t.layer.name!r}",
                  "Dense, Conv1D, Conv2D or DepthwiseConv2D layers of a Functional or Sequential model for criterion 'activation'")  # fmt: skip
        layers = list(dict.fromkeys(t.layer for t in targets))
        probe = keras.Model(model.inputs, [layer.input for layer in layers])
        sums = [None] * len(layers)
        data = _batches(batches, self.name, self.max_batches)
        for x, _ in data:
            outs = probe(x, training=False)
            outs = outs if isinstance(outs, list | tuple) else [outs]
            for i, a in enumerate(outs):
                a = np.abs(_numpy(a)).reshape(-1, a.shape[-1]).mean(axis=0)
                sums[i] = a if sums[i] is None else sums[i] + a
        mean = {id(layer): s / len(data) for layer, s in zip(layers, sums, strict=True)}
        out = []
        for t in targets:
            w = np.abs(_numpy(t.variable))
            a = mean[id(t.layer)]
            shape = [1] * w.ndim
            shape[-2] = a.shape[0]  # the input-channel axis of Dense and Conv kernels
            out.append(w * a.reshape(shape))
        return out

    def get_config(self) -> dict[str, Any]:
        return {"max_batches": self.max_batches}
