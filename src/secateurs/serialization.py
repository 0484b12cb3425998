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


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else by
    the usual set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets under the process umask (0o644 under 0o022), which
    a temporary file from :mod:`tempfile` (always 0o600) is given before it is renamed."""
    return 0o666 & ~_umask()


def canonical_header(data: bytes) -> bytes:
    """``data`` (a safetensors file, or at least its header) with the header in one order:
    ``__metadata__`` first with its keys sorted, then the tensors by offset. safetensors writes
    the metadata in hash order, which differs between processes; this makes identical content
    byte-identical. The header keeps its length (same compact JSON, same padding), so the data
    offsets are unchanged."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted((header.pop("__metadata__") or {}).items()))
    ordered |= dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # not the writer's compact JSON: keep what it wrote
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def canonicalize_file_(path: str | os.PathLike[str]) -> None:
    """Rewrite the header of the safetensors file ``path`` in place by :func:`canonical_header`."""
    with open(path, "rb+") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little")
        block = head + f.read(size)
        fixed = canonical_header(block)
        if fixed != block:
            f.seek(0)
            f.write(fixed)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename.

    A reader sees either the old file or the new one, never a partial write; on failure (disk
    full, permission) the old file is left as it was and the temporary file is removed. The
    file takes the process umask, as any newly created file does.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, file_mode())
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
    return canonical_header(st_save(tensors, metadata={_TREE_KEY: json.dumps(skeleton)}))


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
