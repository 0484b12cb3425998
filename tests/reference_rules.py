"""The AdaGC authors' clipping, transcribed: the reference of tests/test_clip_reference.py and
of bench/clip_quality.py (which puts this folder on its import path)."""

from __future__ import annotations

import math

import torch


class AuthorsAdaGC:
    """``AdaGC.clip_by_norm`` of the AdaGC authors (github.com/lishuai-97/AdaGC, commit 32c249f,
    ``megatron/optimizer/clip_grads.py``), one process and the 2-norm: global clipping to
    ``max_norm`` and the minimum clipped norm per tensor for ``start_clip_steps`` steps, then
    each tensor clipped to ``clip_ratio`` times its EMA."""

    def __init__(
        self, clip_ratio: float, beta: float, start_clip_steps: int, max_norm: float
    ) -> None:
        self.clip_ratio, self.beta, self.start = clip_ratio, beta, start_clip_steps
        self.max_norm, self.eps = max_norm, 1e-6
        self.steps = 0
        self.state: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, params: list[torch.nn.Parameter]) -> None:
        self.steps += 1
        grads = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
        total_norm = math.sqrt(sum(g.norm().item() ** 2 for _, g in grads))
        if self.steps <= self.start:
            coeff = self.max_norm / (total_norm + self.eps)
            if coeff < 1.0:
                for _, g in grads:
                    g.mul_(coeff)
            for i, g in grads:
                n = g.norm()
                if i not in self.state or n < self.state[i]:
                    self.state[i] = n
        else:
            for i, g in grads:
                n = g.norm()
                avg = self.state.setdefault(i, n)
                if n > self.clip_ratio * avg:
                    g.mul_(self.clip_ratio * avg / (n + self.eps))
                    n = self.clip_ratio * avg
                self.state[i] = avg * self.beta + n * (1.0 - self.beta)
