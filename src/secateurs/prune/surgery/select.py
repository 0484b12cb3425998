"""Which units of each channel group to remove: for a cumulative sparsity, a score threshold or a MACs target."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.measure import count_macs
from secateurs.prune.surgery.graph import ChannelGroup, Graph, Inputs

__all__ = ["Selector", "bisect_macs"]


@dataclass(frozen=True)
class Selector:
    """Chooses which units to remove for a cumulative sparsity (or below a threshold), given fixed scores."""

    groups: Sequence[ChannelGroup]
    scores: dict[str, torch.Tensor]
    original: dict[str, int]
    scope: str
    max_layer_sparsity: float
    round_to: int

    def floor(self, cg: ChannelGroup) -> int:
        return max(1, math.ceil(self.original[cg.key] * (1.0 - self.max_layer_sparsity) - 1e-9))

    def __call__(self, sparsity: float) -> dict[str, torch.Tensor]:
        scored = [cg for cg in self.groups if cg.key in self.scores]
        if self.scope == "layer":
            keep = {cg.key: max(self.floor(cg), int(self.original[cg.key] * (1.0 - sparsity) + 0.5)) for cg in scored}
            removal = {cg.key: torch.argsort(self.scores[cg.key], stable=True)[: max(0, cg.units - keep[cg.key])]
                       for cg in scored}
        else:
            removal = self._global(scored, sparsity)
        return {k: self._round(k, v) for k, v in removal.items() if len(v)}

    def below(self, threshold: float) -> dict[str, torch.Tensor]:
        """Every unit scoring below ``threshold`` (the lowest first, down to each group's floor)."""
        removal = {}
        for cg in self.groups:
            if cg.key not in self.scores:
                continue
            s = self.scores[cg.key]
            order = torch.argsort(s, stable=True)[: max(0, cg.units - self.floor(cg))]
            removal[cg.key] = order[s[order] < threshold]
        return {k: self._round(k, v) for k, v in removal.items() if len(v)}

    def _global(self, scored: list[ChannelGroup], sparsity: float) -> dict[str, torch.Tensor]:
        original = sum(self.original[cg.key] * cg.unit_size for cg in scored)
        current = sum(cg.units * cg.unit_size for cg in scored)
        budget = current - int(original * (1.0 - sparsity) + 0.5)
        removal = {cg.key: torch.empty(0, dtype=torch.long) for cg in scored}
        if budget <= 0:
            return removal
        imp, size, owner, unit = [], [], [], []
        for n, cg in enumerate(scored):
            s = self.scores[cg.key]
            s = s / s.mean().clamp_min(1e-12)  # scale-free across layers (Torch-Pruning's "mean")
            order = torch.argsort(s, stable=True)[: max(0, cg.units - self.floor(cg))]
            imp.append(s[order])
            unit.append(order)
            size.append(torch.full((len(order),), cg.unit_size))
            owner.append(torch.full((len(order),), n))
        imp_t, size_t, owner_t, unit_t = (torch.cat(x) for x in (imp, size, owner, unit))
        order = torch.argsort(imp_t, stable=True)
        take = int(torch.searchsorted(torch.cumsum(size_t[order], 0), budget)) + 1
        chosen = order[:take]
        for n, cg in enumerate(scored):
            removal[cg.key] = unit_t[chosen[owner_t[chosen] == n]]
        return removal

    def _round(self, key: str, remove: torch.Tensor) -> torch.Tensor:
        """Give back the best removed units until the kept channel count is a multiple of round_to."""
        cg = next(g for g in self.groups if g.key == key)
        if self.round_to <= 1 or cg.unit_size > 1:
            return remove
        kept = cg.units - len(remove)
        extra = min(len(remove), -kept % self.round_to)
        if extra == 0:
            return remove
        s = self.scores[key][remove]
        return remove[torch.argsort(s, stable=True)[: len(remove) - extra]]


def bisect_macs(
    work: nn.Module,
    example_inputs: Inputs,
    excluded: set[str],
    select: Selector,
    goal: float,
    target: float,
    original_macs: int,
) -> dict[str, torch.Tensor]:
    """The smallest cumulative sparsity whose pruning leaves at most ``goal`` MACs."""
    cache: dict[tuple, int] = {}

    def macs(removal: dict[str, torch.Tensor]) -> int:
        sig = tuple(sorted((k, tuple(v.tolist())) for k, v in removal.items()))
        if sig not in cache:
            trial = copy.deepcopy(work)
            Graph(trial, example_inputs, excluded).prune(removal)
            cache[sig] = count_macs(trial, example_inputs)
        return cache[sig]

    if macs({}) <= goal:
        return {}
    lo, hi = 0.0, 1.0
    most = select(hi)
    if macs(most) > goal:
        reachable = macs(most) / original_macs
        raise SecateursError(
            f"target_macs: got {target}; at most {1 - reachable:.1%} of the MACs can go with "
            f"max_layer_sparsity={select.max_layer_sparsity} and these excluded layers; allowed: "
            f"target_macs >= {reachable:.4f}, or raise max_layer_sparsity"
        )
    # Below this step in the sparsity no unit changes hands: one unit of the largest scope.
    scored = [g for g in select.groups if g.key in select.scores]
    per_scope = [sum(select.original[g.key] for g in scored)] if select.scope == "global" else [
        select.original[g.key] for g in scored]
    resolution = 0.5 / max(per_scope)
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        if macs(select(mid)) <= goal:
            hi = mid
        else:
            lo = mid
    return select(hi)
