"""Gradient (and parameter) clipping for PyTorch: functions, rules, an optimizer wrapper, a log.

Where things live:

* :mod:`~secateurs.clip.functional` - stateless in-place functions (``by_global_norm_``, ...);
* :mod:`~secateurs.clip.rules` - the rule interface and the fixed rules (``Value``, ``Norm``,
  ``GlobalNorm``, ``AGC``, ``Chain``); adaptive rules each in their own module
  (:mod:`~secateurs.clip.autoclip`, :mod:`~secateurs.clip.zclip`, :mod:`~secateurs.clip.adagc`);
* :mod:`~secateurs.clip.registry` - :data:`RULES` (method name -> rule class; ``@register``
  adds one, yours too) and ``build(method, **params)`` for configs and the CLI;
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

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from secateurs.clip.adagc import AdaGC
from secateurs.clip.autoclip import AutoClip
from secateurs.clip.functional import agc_, by_global_norm_, by_norm_, by_value_, clamp_params_
from secateurs.clip.log import ClipLog
from secateurs.clip.registry import NONE, RULES, build, register
from secateurs.clip.rules import AGC, Chain, GlobalNorm, Norm, Rule, Value
from secateurs.clip.stats import ClipStats
from secateurs.clip.wrap import NONFINITE, ClippedOptimizer, NonFiniteGradError, wrap
from secateurs.clip.zclip import ZClip


class _Methods(Sequence[str]):
    """``("none", *RULES)``, read afresh on every use: rules registered later are listed too."""

    def _names(self) -> tuple[str, ...]:
        return (NONE, *RULES)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(RULES) + 1

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name == NONE or name in RULES

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return self._names() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"METHODS{self._names()!r}"


METHODS: Sequence[str] = _Methods()
"""Names accepted by :func:`build`, ``"none"`` (no rule) first; a live view of :data:`RULES`."""

__all__ = [
    "AGC",
    "METHODS",
    "NONFINITE",
    "RULES",
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
    "register",
    "wrap",
]
