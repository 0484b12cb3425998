"""The pruned model against the dense one on evaluation data.

For any model: the mean cosine between the two models' per-example outputs (a Hugging Face
encoder's mean-pooled, normalised ``last_hidden_state``; a classifier's or LM's logits,
mean-pooled over positions) and, where the output is logits, top-1 agreement. For a causal LM,
perplexity; where the data has labels, accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.inputs import forward, tensors_of

__all__ = ["Observed", "agreement", "observe"]


@dataclass
class Observed:
    """What one model gave on the evaluation batches."""

    pooled: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)
    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    labelled: int = 0

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.tokens:
            out["perplexity"] = math.exp(self.nll / self.tokens)
        if self.labelled:
            out["accuracy"] = self.correct / self.labelled
        return out


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch
    return batch, None


@torch.no_grad()
def observe(model: nn.Module, batches: list[Any], *, causal: bool = False) -> Observed:
    """Run ``model`` over ``batches`` and keep what :func:`agreement` compares."""
    seen = Observed()
    model.eval()
    for batch in batches:
        inputs, labels = _split(batch)
        out = forward(model, inputs)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, torch.Tensor) and out.dim() == 2:
            logits = out
        features = getattr(out, "last_hidden_state", None)
        if features is None:
            features = logits if logits is not None else tensors_of(out)[0]
        seen.pooled.append(F.normalize(_pool(features.float(), mask), dim=-1))
        if logits is not None:
            top = logits.argmax(-1)
            seen.top1.append(top[mask.bool()] if mask is not None and top.dim() == 2 else top.reshape(-1))
        if causal and logits is not None:
            ids = inputs["input_ids"]
            valid = (mask if mask is not None else torch.ones_like(ids))[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            seen.nll += float(nll[valid].sum())
            seen.tokens += int(valid.sum())
        if labels is not None and logits is not None and logits.dim() == 2:
            seen.correct += int((logits.argmax(-1) == labels).sum())
            seen.labelled += labels.numel()
    return seen


def _pool(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if features.dim() == 3:
        if mask is not None:
            weights = mask.unsqueeze(-1).to(features.dtype)
            return (features * weights).sum(1) / weights.sum(1).clamp(min=1)
        return features.mean(1)
    return features.reshape(features.shape[0], -1)


def agreement(dense: Observed, pruned: Observed) -> dict[str, float]:
    """Mean cosine of the pooled outputs and (for logits) top-1 agreement."""
    a, b = torch.cat(dense.pooled), torch.cat(pruned.pooled)
    out = {"mean_cosine": float((a * b).sum(-1).mean())}
    if dense.top1:
        ta, tb = torch.cat(dense.top1), torch.cat(pruned.top1)
        out["top1_agreement"] = float((ta == tb).float().mean())
    return out
