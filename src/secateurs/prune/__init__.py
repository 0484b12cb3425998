"""Pruning: bool masks applied in place, importance criteria, selection, schedules, sparse files,
and structured removal of channels.

Where things live:

- :mod:`~secateurs.prune.masks`: which weights are prunable; applying masks in place.
- :mod:`~secateurs.prune.criteria`: importance scores, one registered class per criterion
  (:data:`CRITERIA`); :mod:`~secateurs.prune.activations` records the inputs some of them read.
- :mod:`~secateurs.prune.selection`: global / layer-wise lowest-k and N:M blocks.
- :mod:`~secateurs.prune.pruner`: :class:`Pruner`, which ties them together.
- :mod:`~secateurs.prune.schedules`: one-shot, iterative, AGP and lottery-ticket rewinding.
- :mod:`~secateurs.prune.checkpoint`: sparse safetensors files (bitmask + non-zeros).
- :mod:`~secateurs.prune.report`: per-layer sparsity and FLOPs.
- :mod:`~secateurs.prune.surgery`: structured pruning, :func:`structured` (channels, neurons,
  heads physically removed; its own criteria in :data:`GROUP_CRITERIA`), and
  :func:`structured_transformer` (whole heads / KV groups and MLP neurons of Transformers,
  ``save_pretrained``-ready; criteria in :data:`UNIT_CRITERIA`).
- :mod:`~secateurs.prune.calibration`: one-shot pruning of a trained model from calibration
  data, :func:`oneshot` (Wanda, SparseGPT, OWL; block by block), and :func:`oneshot_streamed`
  (blocks read from a safetensors file one at a time).

>>> import torch
>>> from torch import nn
>>> from secateurs import prune
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> pruner = prune.Pruner(model, sparsity=0.9, criterion="magnitude")
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> pruner.attach(optimizer)
>>> round(pruner.step(), 3)
0.9
>>> round(prune.sparsity_report(model).sparsity, 3)
0.9
"""

from secateurs import _tp  # noqa: F401  (first: Torch-Pruning without timm, see secateurs._tp)
from secateurs.prune import schedules
from secateurs.prune.calibration import OWL, OneshotResult, empty_weights, oneshot, oneshot_streamed
from secateurs.prune.checkpoint import (
    inspect_checkpoint,
    load,
    read_checkpoint,
    read_metadata,
    save,
)
from secateurs.prune.criteria import CRITERIA, Criterion, make_criterion, register
from secateurs.prune.masks import PRUNABLE_MODULES, Target, apply_masks_, find_targets
from secateurs.prune.pruner import SCOPES, Pruner
from secateurs.prune.report import LayerSparsity, SparsityReport, sparsity_report
from secateurs.prune.schedules import SCHEDULES
from secateurs.prune.surgery import (
    GROUP_CRITERIA,
    UNIT_CRITERIA,
    GroupCriterion,
    check_pretrained,
    load_structured,
    pruning_record,
    register_group_criterion,
    register_unit_criterion,
    save_structured,
    structured,
    structured_transformer,
)

__all__ = [
    "CRITERIA",
    "GROUP_CRITERIA",
    "OWL",
    "PRUNABLE_MODULES",
    "SCHEDULES",
    "SCOPES",
    "UNIT_CRITERIA",
    "Criterion",
    "GroupCriterion",
    "LayerSparsity",
    "OneshotResult",
    "Pruner",
    "SparsityReport",
    "Target",
    "apply_masks_",
    "check_pretrained",
    "empty_weights",
    "find_targets",
    "inspect_checkpoint",
    "load",
    "load_structured",
    "make_criterion",
    "oneshot",
    "oneshot_streamed",
    "pruning_record",
    "read_checkpoint",
    "read_metadata",
    "register",
    "register_group_criterion",
    "register_unit_criterion",
    "save",
    "save_structured",
    "schedules",
    "sparsity_report",
    "structured",
    "structured_transformer",
]
