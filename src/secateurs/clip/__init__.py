"""Gradient (and parameter) clipping for PyTorch: functions, rules, an optimizer wrapper, a log.

Where things live:

* :mod:`~secateurs.clip.functional` - stateless in-place functions (``by_global_norm_``, ...);
* :mod:`~secateurs.clip.rules` - the rule interface and the fixed rules (``Value``, ``Norm``,
  ``GlobalNorm``, ``AGC``, ``Chain``); adaptive rules each in their own module
  (:mod:`~secateurs.clip.autoclip`, :mod:`~secateurs.clip.zclip`, :mod:`~secateurs.clip.adagc`);
* :mod:`~secateurs.clip.registry` - ``build(method, **params)`` for configs and the CLI;
* :mod:`~secateurs.clip.wrap` - ``wrap(optimizer, rule)``: clip before every step, skip NaN
  steps without a host sync (:mod:`~secateurs.clip.guard`), log into a
  :class:`~secateurs.clip.log.ClipLog`.

>>> import torch
>>> from secateurs import clip
>>> model = torch.nn.Linear(4, 1)
>>> opt = clip.wrap(torch.optim.AdamW(model.parameters()), clip.build("autoclip", percentile=10))
>>> model(torch.randn(8, 4)).pow(2).mean().backward()
>>> opt.step()
>>> opt.log.total_steps, opt.log.skipped_steps
(1, 0)
"""

from secateurs.clip import registry
from secateurs.clip.adagc import AdaGC
from secateurs.clip.autoclip import AutoClip
from secateurs.clip.functional import agc_, by_global_norm_, by_norm_, by_value_, clamp_params_
from secateurs.clip.log import ClipLog
from secateurs.clip.registry import build
from secateurs.clip.rules import AGC, Chain, GlobalNorm, Norm, Rule, Value
from secateurs.clip.stats import ClipStats
from secateurs.clip.wrap import NONFINITE, ClippedOptimizer, NonFiniteGradError, wrap
from secateurs.clip.zclip import ZClip

METHODS: tuple[str, ...] = ("none", *registry.names())
"""Names accepted by :func:`build` (``"none"`` builds no rule)."""

__all__ = [
    "AGC",
    "METHODS",
    "NONFINITE",
    "AdaGC",
    "AutoClip",
    "Chain",
    "ClipLog",
    "ClipStats",
    "ClippedOptimizer",
    "GlobalNorm",
    "NonFiniteGradError",
    "Norm",
    "Rule",
    "Value",
    "ZClip",
    "agc_",
    "build",
    "by_global_norm_",
    "by_norm_",
    "by_value_",
    "clamp_params_",
    "wrap",
]
