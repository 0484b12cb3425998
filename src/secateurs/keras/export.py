"""After pruning: a per-layer sparsity report, ``strip`` (bake zeros in, drop the masks) and a
sparse save of the weights, in one of two forms chosen by the file name:

* ``*.safetensors``: each masked weight as its packed mask bits and its kept values, about
  1/8 byte + 4 bytes per kept weight instead of 4 bytes per weight; read by :func:`load_sparse`;
* ``*.weights.h5``: Keras' own weights file (the layout of ``model.save_weights``, the model's
  weights without the optimizer's), every dataset stored with HDF5's shuffle + gzip filters,
  which squeeze the runs of zeros; read by stock ``model.load_weights``, no secateurs needed.
"""

from __future__ import annotations

import os
import tempfile
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
    """Save every weight of ``model`` sparsely; the form follows the name (see the module).

    ``*.safetensors``: masked weights as bits + kept values (load with :func:`load_sparse`).
    ``*.weights.h5``: a compressed Keras weights file (load with ``model.load_weights``);
    strip the model first, or it holds the masks' zeros only where the masks were applied.
    The file is written atomically (a temporary file in the same folder, then renamed).
    """
    path = Path(path)
    allowed = "a path ending in .safetensors or .weights.h5"
    check(path.name.endswith((".safetensors", ".weights.h5")), "path", str(path), allowed)
    if path.name.endswith(".weights.h5"):
        return _save_h5(model, path)
    return _save_safetensors(model, path)


def _save_h5(model: Any, path: Path) -> Path:
    import h5py

    sync(model)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        dense = Path(tmp) / "dense.weights.h5"
        model.save_weights(str(dense))  # Keras' own layout, so its own loader reads ours
        packed = Path(tmp) / path.name
        # libver="latest": a one-chunk dataset is then indexed without a B-tree (v1 B-trees
        # cost kilobytes per dataset, more than the zeros save on small layers)
        with h5py.File(dense, "r") as src, h5py.File(packed, "w", libver="latest") as dst:
            dst.attrs.update(src.attrs)
            for key in src:
                if key != "optimizer":  # the weights only, as save_sparse's other form
                    _copy_compressed(src[key], dst, key)
        os.chmod(packed, 0o666 & ~_umask())
        os.replace(packed, path)
    return path


def _copy_compressed(node: Any, parent: Any, key: str) -> None:
    import h5py

    if isinstance(node, h5py.Dataset):
        data = node[()]
        if data.ndim == 0 or data.size == 0:  # HDF5 filters need a chunked, non-empty array
            copy = parent.create_dataset(key, data=data)
        else:
            copy = parent.create_dataset(
                key, data=data, chunks=data.shape, compression="gzip", compression_opts=9, shuffle=True
            )  # one chunk per weight (HDF5 allows up to 4 GiB a chunk)
    else:
        copy = parent.create_group(key)
        for child in node:
            _copy_compressed(node[child], copy, child)
    copy.attrs.update(node.attrs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_safetensors(model: Any, path: Path) -> Path:
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
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "weights": str(len(model.weights))})
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
