"""Shared fixtures. Each test process uses one torch thread: pytest-xdist runs two at a time."""

from __future__ import annotations

import torch

torch.set_num_threads(1)

# A reduced default job: same pipeline, a few epochs, used by end-to-end tests.
QUICK_RUN = [
    "train.epochs=3",
    "prune.epochs=3",
    "prune.finetune_epochs=2",
    "data.limit=600",
]
