"""Safe, atomic persistence: nothing written is ever half a file, nothing loaded runs code.

``save_state`` stores any tree of dicts, lists, scalars and tensors (an optimizer's
``state_dict()``, a pruner's, RNG states) as one safetensors file: tensors as tensors, the tree's
shape as JSON in the header. ``load_state`` reads it back without unpickling anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from secateurs.errors import SecateursError

_TREE_KEY = "secateurs.tree"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename.

    A reader sees either the old file or the new one, never a partial write; on failure (disk
    full, permission) the old file is left as it was and the temporary file is removed.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:  # disk full, file too large, permissions: name the file being written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__t__": name}
    if isinstance(obj, Mapping):
        return {"__d__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tu__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} safely; allowed: tensors, dicts, lists, tuples, scalars, str")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__d__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__d__"]}
        if "__tu__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tu__"])
    return obj


def dumps_state(tree: Any) -> bytes:
    """Serialise a tree of tensors and plain values to safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    return st_save(tensors, metadata={_TREE_KEY: json.dumps(skeleton)})


def save_state(path: str | os.PathLike[str], tree: Any) -> None:
    """Atomically write a tree of tensors and plain values as one safetensors file."""
    atomic_write_bytes(path, dumps_state(tree))


def _header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header larger than the file: truncated")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}


def load_state(path: str | os.PathLike[str]) -> Any:
    """Read a tree written by :func:`save_state`. A truncated or foreign file raises SecateursError."""
    p = Path(path)
    try:
        data = p.read_bytes()
        meta = _header_metadata(data)
        tensors = st_load(data)
        skeleton = json.loads(meta[_TREE_KEY])
    except FileNotFoundError:
        raise SecateursError(f"checkpoint: {str(p)!r} does not exist") from None
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise SecateursError(f"checkpoint: {str(p)!r} is not a secateurs state file or is corrupted ({type(exc).__name__}: {exc})") from None
    return _decode(skeleton, tensors)
