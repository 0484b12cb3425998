"""Structured pruning: whole channels, neurons, hidden units and heads cut out of the model.

Where things live:

- :mod:`~secateurs.prune.surgery.cut`: :func:`structured`, the entry point (score, select,
  cut, verify, record), and :func:`pruning_record`.
- :mod:`~secateurs.prune.surgery.graph`: Torch-Pruning's dependency graph cut into
  :class:`ChannelGroup` s, the coupled channels removed as a unit.
- :mod:`~secateurs.prune.surgery.criteria`: group criteria, one score per channel
  (:data:`GROUP_CRITERIA`).
- :mod:`~secateurs.prune.surgery.select`: which units to remove for a sparsity, a threshold or a
  MACs target.
- :mod:`~secateurs.prune.surgery.layers`: layer pruners Torch-Pruning lacks (RNN/LSTM/GRU,
  attention heads).
- :mod:`~secateurs.prune.surgery.checkpoint`: :func:`save_structured` / :func:`load_structured`.
"""

from secateurs.prune.surgery.checkpoint import load_structured, save_structured
from secateurs.prune.surgery.criteria import (
    GROUP_CRITERIA,
    GroupCriterion,
    make_group_criterion,
    register_group_criterion,
)
from secateurs.prune.surgery.cut import RECORD_ATTR, channel_groups, pruning_record, structured
from secateurs.prune.surgery.graph import ChannelGroup

__all__ = [
    "GROUP_CRITERIA",
    "RECORD_ATTR",
    "ChannelGroup",
    "GroupCriterion",
    "channel_groups",
    "load_structured",
    "make_group_criterion",
    "pruning_record",
    "register_group_criterion",
    "save_structured",
    "structured",
]
