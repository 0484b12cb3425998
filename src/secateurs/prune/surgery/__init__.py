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
- :mod:`~secateurs.prune.surgery.transformer`: :func:`structured_transformer`, whole heads (GQA:
  KV groups) and MLP neurons out of Hugging Face LLaMA/BERT models and
  ``nn.TransformerEncoder``, with the config patched for ``save_pretrained`` (its criteria in
  :data:`UNIT_CRITERIA`).
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
from secateurs.prune.surgery.transformer import (
    UNIT_CRITERIA,
    check_pretrained,
    register_unit_criterion,
    structured_transformer,
    transformer_parts,
)

__all__ = [
    "GROUP_CRITERIA",
    "RECORD_ATTR",
    "UNIT_CRITERIA",
    "ChannelGroup",
    "GroupCriterion",
    "channel_groups",
    "check_pretrained",
    "load_structured",
    "make_group_criterion",
    "pruning_record",
    "register_group_criterion",
    "register_unit_criterion",
    "save_structured",
    "structured",
    "structured_transformer",
    "transformer_parts",
]
