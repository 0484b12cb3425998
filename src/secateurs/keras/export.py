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
    for v in model.weights:
        w = _numpy(v)
        mask = masks.get(id(v))
        if mask is None:
            tensors[v.path] = np.ascontiguousarray(w)
            continue
        tensors[v.path + ":bits"] = np.packbits(mask.reshape(-1))
        tensors[v.path + ":values"] = np.ascontiguousarray(w.reshape(-1)[mask.reshape(-1)])
        tensors[v.path + ":shape"] = np.asarray(w.shape, np.int64)
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "secateurs.keras.sparse/1"})
    return path


def load_sparse(model: Any, path: str | Path) -> None:
    """Load a file of :func:`save_sparse` into ``model`` (same architecture, built)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        fmt = (f.metadata() or {}).get("format")
    check(fmt == "secateurs.keras.sparse/1", "path", str(path), "a file written by secateurs.keras.save_sparse")
    tensors = load_file(str(path))
    for v in model.weights:
        if v.path in tensors:
            v.assign(tensors[v.path])
            continue
        if v.path + ":bits" not in tensors:
            raise SecateursError(f"path: got {str(path)!r} without weight {v.path!r}; allowed: a file of this model")
        shape = tuple(int(s) for s in tensors[v.path + ":shape"])
        size = int(np.prod(shape))
        mask = np.unpackbits(tensors[v.path + ":bits"])[:size].astype(bool)
        dense = np.zeros(size, tensors[v.path + ":values"].dtype)
        dense[mask] = tensors[v.path + ":values"]
        v.assign(dense.reshape(shape))
