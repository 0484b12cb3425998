"""Helpers of the Keras cases (run with KERAS_BACKEND set, see tests/test_keras.py)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def mlp(seed: int = 0, inputs: int = 6, hidden: int = 5, classes: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(classes)]
    )


def data(n: int = 32, inputs: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, inputs)).astype("float32"), rng.integers(0, classes, n)


LOSS = "sparse_categorical_crossentropy"


def compile_(model, optimizer, **kw):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, **kw)
    return model


def values(variables) -> list[np.ndarray]:
    return [numpy(v).copy() for v in variables]


def grads_like(variables, seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=tuple(v.shape)) * scale).astype("float32") for v in variables]


def tensors(arrays) -> list:
    return [ops.convert_to_tensor(a) for a in arrays]
