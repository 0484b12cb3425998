"""Sparse checkpoints: safetensors files holding a bitmask and the non-zero values.

A floating-point tensor with enough zeros is stored as two safetensors entries,
``<name>::bitmask`` (uint8, one bit per element, little-endian bit order) and ``<name>::values``
(the elements whose bit pattern is not zero, in row-major order, in the tensor's own dtype);
everything else is stored as is under its own name. The header metadata (safetensors allows
only strings there) carries ``secateurs.format`` and ``secateurs.layout``, a JSON object giving
each tensor's shape, dtype and encoding, plus any metadata the caller adds. Values are copied by
bit pattern, so the round trip is bit-exact (``-0.0`` and NaN payloads included). At 90%
sparsity an fp32 model takes ``0.1 * 4 + 1/8`` bytes per weight: 0.13x the dense file.

Files are written to a temporary name in the same folder, flushed, then moved into place with
``os.replace``: a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.errors import SecateursError
from secateurs.serialization import canonicalize_file_, file_mode

__all__ = ["FORMAT", "inspect_checkpoint", "load", "read_checkpoint", "read_metadata", "save"]

FORMAT = "secateurs.sparse/1"
_FORMAT_KEY = "secateurs.format"
_LAYOUT_KEY = "secateurs.layout"
_BITMASK = "::bitmask"
_VALUES = "::values"

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, path: object) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SecateursError(f"checkpoint: got {str(path)!r} with unknown dtype {name!r}; allowed: torch dtypes")
    return dtype


def _bits(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor viewed as integers of the same width, if it is a real floating type."""
    if not tensor.is_floating_point():
        return None
    return tensor.view(_INT_VIEW[tensor.element_size()])


def _encode(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
    bits = _bits(tensor) if tensor.numel() else None
    if bits is not None:
        nonzero = bits.reshape(-1) != 0
        count = int(nonzero.sum())
        sparse_bytes = count * tensor.element_size() + math.ceil(tensor.numel() / 8)
        if sparse_bytes < tensor.numel() * tensor.element_size():
            packed = np.packbits(nonzero.numpy(), bitorder="little")
            out[name + _BITMASK] = torch.from_numpy(packed)
            out[name + _VALUES] = bits.reshape(-1)[nonzero].view(tensor.dtype)
            entry["encoding"] = "bitmask"
            return entry
    out[name] = tensor
    entry["encoding"] = "dense"
    return entry


def save(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write ``model``'s state_dict (or a state dict) to ``path`` sparsely; returns the file size.

    >>> import tempfile
    >>> model = nn.Linear(64, 64, bias=False)
    >>> with torch.no_grad():
    ...     model.weight[:, 8:] = 0
    >>> with tempfile.TemporaryDirectory() as d:
    ...     size = save(model, f"{d}/m.safetensors")
    ...     restored = load(f"{d}/m.safetensors", nn.Linear(64, 64, bias=False))
    >>> torch.equal(restored.weight, model.weight), size < 64 * 64 * 4 * 0.2
    (True, True)
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str) or key.startswith("secateurs."):
            raise SecateursError(
                f"metadata[{key!r}]: got {value!r}; allowed: str -> str, keys not starting with 'secateurs.'"
            )
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise SecateursError(f"state[{name!r}]: got {type(tensor).__name__}; allowed: tensors only")
        if name.endswith((_BITMASK, _VALUES)):
            raise SecateursError(f"state: got key {name!r}; allowed: keys not ending in '::bitmask' or '::values'")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()  # tied weights: safetensors refuses shared storage
        storages.add(storage)
        layout[name] = _encode(name, tensor, tensors)
    header = {_FORMAT_KEY: FORMAT, _LAYOUT_KEY: json.dumps(layout, separators=(",", ":"))} | extra
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=header)
        canonicalize_file_(temporary)  # safetensors writes metadata keys in hash order
        os.chmod(temporary, file_mode())  # the process umask, as any new file
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    return target.stat().st_size


def _open(path: str | os.PathLike[str]) -> tuple[Any, dict[str, str]]:
    target = Path(path)
    if target.is_dir():
        found = sorted(p.name for p in target.glob("*.safetensors"))
        such = f" such as {str(target / found[0])!r}" if found else ""
        raise SecateursError(f"checkpoint: got {str(path)!r}, which is a folder; allowed: a .safetensors file{such}")
    if not target.is_file():
        raise SecateursError(f"checkpoint: got {str(path)!r}; no such file; allowed: a .safetensors file")
    try:
        handle = safe_open(str(target), framework="pt")
        header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for any malformed file
        raise SecateursError(
            f"checkpoint: got {str(path)!r}, which is not a safetensors file ({exc}); allowed: a "
            "file written by secateurs.prune.save or safetensors"
        ) from None
    return handle, header


def _layout(handle: Any, header: Mapping[str, str], path: object) -> dict[str, dict[str, Any]]:
    """Per logical tensor: shape, dtype, encoding (a plain safetensors file is all dense)."""
    if _FORMAT_KEY not in header:
        layout = {}
        names = handle.keys()
        for name in names:
            piece = handle.get_slice(name)
            layout[name] = {"shape": list(piece.get_shape()), "dtype": None, "encoding": "dense"}
        return layout
    if header[_FORMAT_KEY] != FORMAT:
        raise SecateursError(
            f"checkpoint: got {str(path)!r} in format {header[_FORMAT_KEY]!r}; allowed: {FORMAT!r}"
        )
    try:
        layout = json.loads(header[_LAYOUT_KEY])
        keys = set(handle.keys())
        for name, entry in layout.items():
            needed = [name + _BITMASK, name + _VALUES] if entry["encoding"] == "bitmask" else [name]
            if entry["encoding"] not in ("bitmask", "dense") or not set(needed) <= keys:
                raise ValueError(f"entry {name!r} is incomplete")
            entry["shape"] = [int(v) for v in entry["shape"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SecateursError(
            f"checkpoint: got {str(path)!r} with a corrupt secateurs layout ({exc}); allowed: a file "
            "written by secateurs.prune.save"
        ) from None
    return layout


def _decode(handle: Any, name: str, entry: Mapping[str, Any], path: object) -> torch.Tensor:
    if entry["encoding"] == "dense":
        return handle.get_tensor(name)
    dtype = _dtype(entry["dtype"], path)
    shape = entry["shape"]
    numel = math.prod(shape)
    packed = handle.get_tensor(name + _BITMASK).numpy()
    values = handle.get_tensor(name + _VALUES)
    nonzero = torch.from_numpy(np.unpackbits(packed, count=numel, bitorder="little").astype(bool))
    if values.dtype != dtype or int(nonzero.sum()) != values.numel():
        raise SecateursError(f"checkpoint: got {str(path)!r} whose tensor {name!r} does not match its bitmask")
    bits = torch.zeros(numel, dtype=_INT_VIEW[values.element_size()])
    bits[nonzero] = values.view(bits.dtype)
    return bits.view(dtype).reshape(shape)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (sparse or plain safetensors), dense, on the CPU."""
    handle, header = _open(path)
    layout = _layout(handle, header, path)
    return {name: _decode(handle, name, entry, path) for name, entry in layout.items()}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The caller's metadata saved with ``path`` (the secateurs.* keys left out)."""
    _, header = _open(path)
    return {k: v for k, v in header.items() if not k.startswith("secateurs.")}


def load(path: str | os.PathLike[str], model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load ``path`` into ``model`` (in place, onto its devices); returns the model."""
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise SecateursError(
            f"checkpoint: got {str(path)!r}, which does not fit {type(model).__name__} "
            f"({' '.join(line.strip() for line in first[:3])}); allowed: a checkpoint of this model"
        ) from None
    return model


_TREE_KEY = "secateurs.tree"  # a training state file (secateurs.serialization.save_state)


def _tree_names(skeleton: Any, path: str = "") -> dict[str, str]:
    """Stored tensor name -> its place in a state file's tree (``model/features.0.weight``)."""
    names: dict[str, str] = {}
    if isinstance(skeleton, list):
        for i, v in enumerate(skeleton):
            names |= _tree_names(v, f"{path}/{i}" if path else str(i))
    elif isinstance(skeleton, dict):
        if "__t__" in skeleton:
            names[str(skeleton["__t__"])] = path or "(root)"
        elif "__d__" in skeleton:
            for k, v in skeleton["__d__"]:
                names |= _tree_names(v, f"{path}/{k}" if path else str(k))
        elif "__tu__" in skeleton:
            names |= _tree_names(skeleton["__tu__"], path)
    return names


def _checked_bitmask(handle: Any, name: str, entry: Mapping[str, Any], path: object) -> torch.Tensor:
    """The stored non-zero values of a bitmask entry, once the bitmask is checked against them:
    the mask's length, its popcount (one set bit per stored value), its padding bits (zero), the
    values' dtype, and that no stored value has an all-zero bit pattern."""
    numel = math.prod(entry["shape"])
    packed = handle.get_tensor(name + _BITMASK)
    values = handle.get_tensor(name + _VALUES)

    def bad(why: str) -> SecateursError:
        return SecateursError(f"checkpoint: got {str(path)!r} whose tensor {name!r} does not match its bitmask ({why})")

    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise bad(f"{packed.numel()} bitmask bytes of {_dtype_name(packed.dtype)}; {math.ceil(numel / 8)} uint8 expected for {numel} elements")
    if _dtype_name(values.dtype) != entry["dtype"] or values.dim() != 1:
        raise bad(f"values are {_dtype_name(values.dtype)} of {values.dim()} dimensions; the layout says {entry['dtype']}, 1-D")
    bits = np.unpackbits(packed.numpy(), bitorder="little")
    if bits[numel:].any():
        raise bad("bits set past the end of the tensor")
    ones = int(bits[:numel].sum())
    if ones != values.numel():
        raise bad(f"{ones} bits set for {values.numel()} stored values")
    if values.numel() and bool((values.view(_INT_VIEW[values.element_size()]) == 0).any()):
        raise bad("a stored value is zero, which the bitmask leaves out")
    return values


def inspect_checkpoint(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per tensor of ``path``: name, shape, dtype, params, zeros, non-finite, sparsity, bytes,
    encoding, after checking it.

    Works on sparse checkpoints, plain safetensors files and training state files
    (``checkpoint.safetensors``, whose tensors are named by their place in the state:
    ``model/features.0.weight``, ``optimizer/state/0/exp_avg``), without a model. ``bytes`` is
    what the tensor takes in the file; ``nonfinite`` counts its NaN and infinite elements;
    ``in_model`` is False for a state file's tensors outside ``model/``.
    A bitmask that does not match its values, or a layout the file does not hold, raises
    :class:`SecateursError` (as :func:`read_checkpoint` does).
    """
    handle, header = _open(path)
    layout = _layout(handle, header, path)
    names = {name: name for name in layout}
    if _TREE_KEY in header:
        try:
            tree = _tree_names(json.loads(header[_TREE_KEY]))
        except (ValueError, TypeError):
            tree = {}
        order = {stored: i for i, stored in enumerate(tree)}
        layout = dict(sorted(layout.items(), key=lambda kv: order.get(kv[0], len(order))))
        names = {name: tree.get(name, name) for name in layout}
    rows = []
    for name, entry in layout.items():
        if entry["encoding"] == "bitmask":
            values = _checked_bitmask(handle, name, entry, path)
            packed = handle.get_slice(name + _BITMASK).get_shape()
            numel = math.prod(entry["shape"])
            zeros = numel - values.numel() + int((values == 0).sum())
            nonfinite = int((~torch.isfinite(values)).sum())
            stored = values.numel() * values.element_size() + math.prod(packed)
            dtype = entry["dtype"]
        else:
            tensor = handle.get_tensor(name)
            numel = tensor.numel()
            zeros = int((tensor == 0).sum()) if tensor.dtype != torch.bool else int((~tensor).sum())
            nonfinite = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() or tensor.is_complex() else 0
            stored = numel * tensor.element_size()
            dtype = _dtype_name(tensor.dtype)
        rows.append(
            {
                "name": names[name],
                "shape": list(entry["shape"]),
                "dtype": dtype,
                "params": numel,
                "zeros": zeros,
                "nonfinite": nonfinite,
                "sparsity": zeros / numel if numel else 0.0,
                "bytes": stored,
                "encoding": entry["encoding"],
                # a state file's optimizer, pruner and clip log (NaN norms of skipped steps) are not
                "in_model": _TREE_KEY not in header or names[name].startswith("model/"),
            }
        )
    return rows
