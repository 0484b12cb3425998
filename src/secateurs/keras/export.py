"""After pruning: a per-layer sparsity report, ``strip`` (bake zeros in, drop the masks) and a
sparse save of the weights (safetensors: each masked weight as its packed mask bits and its
kept values, about 1/8 byte + 4 bytes per kept weight instead of 4 bytes per weight)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from keras import ops

from secateurs.errors import SecateursError, check
from secateurs.keras._model import sync, wrapped_optimizer

__all__ = ["LayerSparsity", "load_sparse", "save_sparse", "sparsity_report", "strip"]


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


@dataclass(frozen=True)
class LayerSparsity:
    """One weight's line of :func:`sparsity_report`."""

    weight: str
    shape: tuple[int, ...]
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


def sparsity_report(model: Any, *, masked_only: bool = True) -> list[LayerSparsity]:
    """Zeros per weight (those with a mask in the wrapped optimizer, or every trainable weight
    with ``masked_only=False``), plus a last ``"total"`` row."""
    sync(model)
    if masked_only:
        variables = [v for v, _ in wrapped_optimizer(model).masks]
    else:
        variables = list(model.trainable_variables)
    rows = []
    for v in variables:
        w = _numpy(v)
        rows.append(LayerSparsity(v.path, tuple(w.shape), int(w.size), int((w == 0).sum())))
    rows.append(LayerSparsity("total", (), sum(r.params for r in rows), sum(r.zeros for r in rows)))
    return rows


def to_markdown(rows: list[LayerSparsity]) -> str:
    """The report as a Markdown table."""
    lines = ["| weight | shape | params | sparsity |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.weight} | {'x'.join(map(str, r.shape))} | {r.params} | {r.sparsity:.1%} |")
    return "\n".join(lines)


def strip(model: Any) -> Any:
    """Bake the masks into the weights and give the model back its inner optimizer.

    The model then saves and loads as a plain Keras model (no secateurs objects in it), as
    TFMOT's ``strip_pruning``; its pruned weights are exact zeros. Returns ``model``.
    """
    sync(model)
    optimizer = wrapped_optimizer(model)
    for variable, mask in optimizer.masks:
        variable.assign(_numpy(variable) * _numpy(mask).astype(_numpy(variable).dtype))
    compiled = getattr(getattr(model, "_compile_config", None), "config", None)
    if compiled:  # compile again with the inner optimizer (its state kept), so saving forgets the wrapper
        model.compile(**{**compiled, "optimizer": optimizer.inner_optimizer})
    else:
        model.optimizer = optimizer.inner_optimizer
        model.train_function = None
    return model


def save_sparse(model: Any, path: str | Path) -> Path:
    """Save every weight of ``model`` to a safetensors file, masked weights sparsely."""
    from safetensors.numpy import save_file

    sync(model)
    masks = {}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "mask_of"):
        masks = {id(v): _numpy(m).astype(bool) for v, m in optimizer.masks}
    tensors: dict[str, np.ndarray] = {}
    for i, v in enumerate(model.weights):
        w = _numpy(v)
        key = _key(i, v)
        mask = masks.get(id(v))
        if mask is None:
            tensors[key] = np.ascontiguousarray(w)
            continue
        tensors[key + ":bits"] = np.packbits(mask.reshape(-1))
        tensors[key + ":values"] = np.ascontiguousarray(w.reshape(-1)[mask.reshape(-1)])
        tensors[key + ":shape"] = np.asarray(w.shape, np.int64)
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": _FORMAT, "weights": str(len(model.weights))})
    return path


_FORMAT = "secateurs.keras.sparse/1"


def _key(index: int, variable: Any) -> str:
    """Weights are matched by position in ``model.weights`` (paths change with layer names)."""
    return f"{index:05d}/{variable.name}"


def load_sparse(model: Any, path: str | Path) -> None:
    """Load a file of :func:`save_sparse` into ``model`` (same architecture, built)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        fmt = (f.metadata() or {}).get("format")
    check(fmt == _FORMAT, "path", str(path), "a file written by secateurs.keras.save_sparse")
    tensors = load_file(str(path))
    for i, v in enumerate(model.weights):
        key = _key(i, v)
        if key in tensors:
            dense = tensors[key]
        elif key + ":bits" in tensors:
            shape = tuple(int(s) for s in tensors[key + ":shape"])
            size = int(np.prod(shape))
            mask = np.unpackbits(tensors[key + ":bits"])[:size].astype(bool)
            dense = np.zeros(size, tensors[key + ":values"].dtype)
            dense[mask] = tensors[key + ":values"]
            dense = dense.reshape(shape)
        else:
            raise SecateursError(f"path: got {str(path)!r} without weight {key!r}; allowed: a file of this model")
        if tuple(dense.shape) != tuple(v.shape):
            raise SecateursError(f"path: got {str(path)!r} with {key!r} of shape {dense.shape}; allowed: shape {tuple(v.shape)}")
        v.assign(dense)
