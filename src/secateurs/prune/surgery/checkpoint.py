"""Save and reload a structurally pruned model without pickling code.

A pruned model has the same classes as the original but smaller layers, so ``torch.save`` of
the whole module (pickled code) is the usual workaround. Here the checkpoint is one safetensors
file: the tensors, plus JSON metadata with each layer's shape attributes (``out_channels``,
``hidden_size``, ``num_heads``...) and the :func:`~secateurs.prune.pruning_record`.
:func:`load_structured` takes a freshly built *original* model (from its definition), reshapes
its layers to the saved shapes and loads the weights.

>>> import tempfile, torch
>>> from secateurs.prune import structured
>>> net = lambda: torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> small = structured(net(), torch.zeros(1, 8), sparsity=0.5)
>>> path = tempfile.mkdtemp() + "/small.safetensors"
>>> save_structured(small, path)
>>> load_structured(path, net())[0].out_features
16
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.errors import SecateursError
from secateurs.prune.surgery.cut import RECORD_ATTR, pruning_record
from secateurs.serialization import canonicalize_file_, file_mode

__all__ = ["FORMAT", "load_structured", "save_structured"]

FORMAT = "secateurs.structured"
VERSION = 1
_META_KEY = "secateurs"

#: Layer attributes that describe a shape; every one present on a layer is saved.
SHAPE_ATTRS = (
    "in_features", "out_features", "in_channels", "out_channels", "groups",
    "num_features", "normalized_shape", "num_groups", "num_channels",
    "input_size", "hidden_size", "proj_size",
    "embed_dim", "num_heads", "head_dim", "kdim", "vdim",
    "num_embeddings", "embedding_dim", "num_parameters", "hidden_dim", "attn_dim",
)


def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for attr in SHAPE_ATTRS:
        value = module.__dict__.get(attr)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
            out[attr] = list(value) if isinstance(value, tuple) else value
    return out


def save_structured(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights and layer shapes to one safetensors file, atomically.

    The file is written next to ``path`` under a temporary name and renamed into place, so a
    crash never leaves a half-written checkpoint behind.
    """
    path = Path(path)
    layers = {name: attrs for name, m in model.named_modules() if (attrs := _shape_attrs(m))}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": type(model).__qualname__,
        "layers": layers,
        "record": pruning_record(model),
    }
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[key] = t.clone() if ident in seen and t.numel() else t
        seen.add(ident)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        canonicalize_file_(tmp)  # one header order: identical models, identical bytes
        os.chmod(tmp, file_mode())  # the process umask, as any new file (save_file leaves 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise SecateursError(f"path: got {str(path)!r}; no such file; allowed: a file written by save_structured") from None
    except Exception as exc:
        raise SecateursError(f"path: got {str(path)!r}; not a safetensors file ({exc}); allowed: a file written by save_structured") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SecateursError(f"path: got {str(path)!r}; a safetensors file without structured-pruning metadata; allowed: a file written by save_structured")
    if meta.get("version") != VERSION:
        raise SecateursError(f"path: got {str(path)!r} with format version {meta.get('version')!r}; allowed: version {VERSION}")
    return meta, tensors


def load_structured(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Reshape a freshly built original ``model`` to the saved shapes, load the weights, return it.

    ``model`` must come from the same definition as the model that was pruned (same class and
    constructor arguments); it is modified in place. Its pruning record is restored, so further
    :func:`~secateurs.prune.surgery.structured` calls stay relative to the original size.
    """
    meta, tensors = _read(Path(path))
    if meta.get("model") != type(model).__qualname__:
        raise SecateursError(
            f"model: got {type(model).__qualname__}; the checkpoint {str(path)!r} was saved from "
            f"{meta.get('model')}; allowed: a fresh instance of {meta.get('model')}"
        )
    modules = dict(model.named_modules())
    for name, attrs in meta["layers"].items():
        if name not in modules:
            raise SecateursError(
                f"model: layer {name!r} of checkpoint {str(path)!r} is not in the model; allowed: "
                "the architecture that was saved, built from its original definition"
            )
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    _reshape_tensors(model, modules, tensors, str(path))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise SecateursError(f"model: the checkpoint {str(path)!r} does not fit it ({exc}); allowed: the architecture that was saved") from None
    if meta.get("record") is not None:
        setattr(model, RECORD_ATTR, meta["record"])
    return model


def _reshape_tensors(model: nn.Module, modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], path: str) -> None:
    """Swap every parameter and buffer for an empty tensor of the saved shape (ties kept)."""
    replaced: dict[int, nn.Parameter] = {}
    for key, saved in tensors.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None or (attr not in owner._parameters and attr not in owner._buffers):
            raise SecateursError(f"model: checkpoint {path!r} holds {key!r}, which the model does not have; allowed: the architecture that was saved")
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if old is None:
                continue
            if id(old) not in replaced:
                replaced[id(old)] = nn.Parameter(
                    torch.empty(saved.shape, dtype=saved.dtype, device=old.device), requires_grad=old.requires_grad
                )
            owner._parameters[attr] = replaced[id(old)]
        else:
            old_buf = owner._buffers[attr]
            device = old_buf.device if old_buf is not None else torch.device("cpu")
            owner._buffers[attr] = torch.empty(saved.shape, dtype=saved.dtype, device=device)
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()
