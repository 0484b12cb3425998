"""Torch-Pruning, imported without pulling in timm.

``torch_pruning.utils.op_counter`` imports timm whenever timm is installed, only to add MAC rules
for two timm attention classes; timm in turn imports torchvision and ``torch._dynamo``, about
3 s of CPU on every ``secateurs`` process. Here Torch-Pruning is imported with timm hidden
(its ``import timm`` fails, as when timm is not installed) unless timm is already loaded, and
:func:`timm_rules` adds those two rules back whenever timm is loaded, which is the only case in
which a timm model can exist. ``secateurs.prune`` and ``secateurs.measure`` import this module
before anything else imports Torch-Pruning.
"""

from __future__ import annotations

import sys
from typing import Any

_hide = "timm" not in sys.modules
if _hide:
    sys.modules["timm"] = None  # type: ignore[assignment]  # makes ``import timm`` raise ImportError
try:
    import torch_pruning as tp
    import torch_pruning.utils.op_counter as op_counter
finally:
    if _hide and sys.modules.get("timm", 0) is None:
        del sys.modules["timm"]

__all__ = ["op_counter", "timm_rules", "tp"]


def timm_rules() -> dict[type, Any]:
    """Torch-Pruning's MAC rules for timm's attention classes, when timm is loaded (else none)."""
    if sys.modules.get("timm") is None:
        return {}
    from timm.models import swin_transformer, vision_transformer

    hook = op_counter.timm_multihead_attention_counter_hook
    return {vision_transformer.Attention: hook, swin_transformer.WindowAttention: hook}
