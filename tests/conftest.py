"""Shared fixtures. Each test process uses one torch thread: pytest-xdist runs two at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

# A reduced default job: same pipeline, a few epochs, used by end-to-end tests.
QUICK_RUN = [
    "train.epochs=3",
    "prune.epochs=3",
    "prune.finetune_epochs=2",
    "data.limit=600",
]


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit (header order may differ)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
