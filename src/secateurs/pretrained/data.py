"""Calibration and evaluation data in the forms people keep it.

- a text file (one text per non-empty line) or JSONL (one object with a ``"text"`` field, or a
  string, per line), tokenised with the model's own tokenizer: a causal LM gets fixed-length
  windows of ``seq_len`` tokens cut from the concatenated texts, any other model one padded,
  truncated sequence per text (padding is masked out of every statistic);
- a ``.npz`` or ``.safetensors`` file of input tensors (one tensor: positional input; several:
  keyword inputs, e.g. ``input_ids`` and ``attention_mask``; a ``labels`` tensor is kept for
  accuracy), cut along dim 0 into batches;
- a torchvision ``ImageFolder`` (a folder of class folders): resized to 256, centre-cropped to
  224, ImageNet-normalised, with its labels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import SecateursError

__all__ = ["read_batches"]


def read_batches(
    path: Path, *, field: str, tokenizer: Any = None, causal: bool = False, seq_len: int = 128,
    samples: int = 128, batch_size: int = 8,
) -> list[Any]:
    """At most ``samples`` examples from ``path`` in batches of ``batch_size``: each batch is
    model inputs, or ``(inputs, labels)`` when the data has labels."""
    if path.is_dir():
        return _images(path, field, samples, batch_size)
    if not path.is_file():
        raise SecateursError(f"{field}: got {str(path)!r}, which does not exist; allowed: a text, JSONL, .npz or .safetensors file, or an image folder")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors"):
        return _tensors(path, field, suffix, samples, batch_size)
    texts = _texts(path, field, jsonl=suffix in (".jsonl", ".json"))
    if tokenizer is None:
        raise SecateursError(
            f"{field}: got text ({str(path)!r}) but MODEL has no tokenizer; allowed: a model folder with its "
            "tokenizer files, or input tensors (.npz / .safetensors)"
        )
    if causal:
        return _windows(texts, tokenizer, field, path, seq_len, samples, batch_size)
    chosen = texts[:samples]
    return [
        dict(tokenizer(chosen[i : i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt"))
        for i in range(0, len(chosen), batch_size)
    ]


def _texts(path: Path, field: str, *, jsonl: bool) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecateursError(f"{field}: got {str(path)!r}, which cannot be read as UTF-8 text ({exc})") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except ValueError:
                raise SecateursError(f"{field}: got {str(path)!r}, whose line {number} is not JSON; allowed: one object with a 'text' field per line") from None
            text = item.get("text") if isinstance(item, Mapping) else item
            if not isinstance(text, str):
                raise SecateursError(f"{field}: got {str(path)!r}, whose line {number} has no 'text' string; allowed: one object with a 'text' field per line")
            texts.append(text)
        else:
            texts.append(line.strip())
    if not texts:
        raise SecateursError(f"{field}: got {str(path)!r}, which holds no text; allowed: a file with at least one non-empty line")
    return texts


def _windows(texts: list[str], tokenizer: Any, field: str, path: Path, seq_len: int, samples: int, batch_size: int) -> list[Any]:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    count = min(len(ids) // seq_len, samples)
    if count == 0:
        raise SecateursError(
            f"{field}: got {str(path)!r} with {len(ids)} tokens, too short for one window of --seq-len {seq_len}; "
            "allowed: more text, or a smaller --seq-len"
        )
    windows = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in windows.split(batch_size)
    ]


def _tensors(path: Path, field: str, suffix: str, samples: int, batch_size: int) -> list[Any]:
    try:
        if suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: torch.from_numpy(archive[k].copy()) for k in archive.files}
        else:
            from safetensors.torch import load

            arrays = load(path.read_bytes())
    except Exception as exc:  # a corrupt archive raises many kinds of error
        raise SecateursError(f"{field}: got {str(path)!r}, which is not a readable {suffix} file ({type(exc).__name__}: {exc})") from None
    labels = arrays.pop("labels", None)
    if not arrays:
        raise SecateursError(f"{field}: got {str(path)!r} with no input tensor; allowed: at least one array besides 'labels'")
    sizes = {t.shape[0] if t.dim() else 0 for t in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise SecateursError(f"{field}: got {str(path)!r} whose tensors differ in their first dimension; allowed: tensors of one batch size")
    n = min(sizes.pop(), samples)
    out: list[Any] = []
    for start in range(0, n, batch_size):
        piece = {k: v[start : min(start + batch_size, n)] for k, v in arrays.items()}
        inputs: Any = next(iter(piece.values())) if len(piece) == 1 else piece
        out.append(inputs if labels is None else (inputs, labels[start : min(start + batch_size, n)]))
    return out


def _images(folder: Path, field: str, samples: int, batch_size: int) -> list[Any]:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise SecateursError(f"{field}: an image folder needs torchvision; allowed: pip install 'secateurs[vision]'") from None
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise SecateursError(f"{field}: got {str(folder)!r}, which is not an image folder ({exc}); allowed: one folder of images per class") from None
    indices = sorted(random.Random(0).sample(range(len(dataset)), min(samples, len(dataset))))
    out = []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out
