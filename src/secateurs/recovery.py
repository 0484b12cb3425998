"""Recovery after structured pruning: a short distillation from the dense model, clipped.

Structured removal (:func:`secateurs.prune.structured_transformer`) loses some of what the dense
model computed; a few hundred optimizer steps of distillation on the calibration data win most
of it back. The pruned *student* learns to reproduce the dense *teacher*'s outputs on the same
batches (no labels): the teacher's next-token distribution (KL divergence) for a model with
``logits``, else its last hidden states (mean squared error, or ``1 - cosine``), over the
positions that are not padding. The optimizer is wrapped with :func:`secateurs.clip.wrap`, so any
clipping rule of :mod:`secateurs.clip` bounds the updates (and non-finite steps are skipped).

This lives outside :mod:`secateurs.prune` because it uses :mod:`secateurs.clip` (the two library
layers never import each other).

>>> import torch
>>> from torch import nn
>>> from secateurs import clip, prune
>>> torch.manual_seed(0) and None
>>> layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
>>> dense = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
>>> data = [torch.randn(4, 6, 16) for _ in range(4)]
>>> small = prune.structured_transformer(dense, neurons=0.5)
>>> result = distill(small, dense, data, steps=20, lr=1e-3, rule=clip.GlobalNorm(1.0))
>>> result.losses[-1] < result.losses[0], result.log.total_steps
(True, 20)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from secateurs.clip import ClipLog, Rule, wrap
from secateurs.errors import SecateursError, check, check_choice, check_int, check_positive
from secateurs.inputs import forward, to_device
from secateurs.prune.calibration.capture import Batch, make_batches

__all__ = ["LOSSES", "DistillResult", "distill"]

LOSSES = ("auto", "kl", "mse", "cosine")
"""``kl``: KL(teacher || student) of the next-token distributions (needs ``logits``); ``mse`` /
``cosine``: mean squared error / ``1 - cosine`` of the last hidden states; ``auto``: ``kl`` when
the output has logits, else ``mse``."""


@dataclass
class DistillResult:
    """What :func:`distill` did: the loss of every step (float, read once at the end) and the
    clipping log of its optimizer (norms before/after, clipped and skipped steps)."""

    losses: list[float]
    log: ClipLog


def _main_output(output: Any, kind: str) -> torch.Tensor:
    """The tensor distillation matches: ``logits`` for ``kl``, else the last hidden states."""
    if isinstance(output, torch.Tensor):
        return output
    if kind == "kl":
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SecateursError(
        f"student: its output ({type(output).__name__}) holds no tensor to match; allowed: a model returning a "
        "tensor, a tuple starting with one, or an output with logits / last_hidden_state"
    )


def _resolve_loss(loss: str, output: Any) -> str:
    if loss != "auto":
        if loss == "kl":
            check(isinstance(getattr(output, "logits", None), torch.Tensor), "loss", loss,
                  "'kl' for models whose output has logits; else 'mse' or 'cosine'")
        return loss
    return "kl" if isinstance(getattr(output, "logits", None), torch.Tensor) else "mse"


def _distance(kind: str, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the non-padding positions of the per-position distance."""
    s, t = student.float(), teacher.float()
    if kind == "kl":
        per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        per = (s - t).square().mean(-1)
    if valid is not None and tuple(per.shape) == tuple(valid.shape):
        v = valid.to(per.device, per.dtype)
        return (per * v).sum() / v.sum().clamp_min(1.0)
    return per.mean()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    calibration: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 5e-5,
    rule: Rule | None = None,
    loss: str = "auto",
    weight_decay: float = 0.0,
    seed: int = 0,
) -> DistillResult:
    """Train ``student`` in place for ``steps`` AdamW steps to reproduce ``teacher`` on ``calibration``.

    ``calibration``: batches of model inputs (tensors, tuples, or mappings such as tokenizer
    outputs, whose ``attention_mask`` keeps padding out of the loss); the teacher's outputs are
    computed once per batch, and the batches are cycled in a fresh order (``seed``) each pass.
    ``rule``: a :mod:`secateurs.clip` rule (``clip.GlobalNorm(1.0)``, ``clip.build("autoclip")``...)
    applied before every step by :func:`secateurs.clip.wrap`, or None for no clipping (norms are
    still logged, non-finite steps still skipped). ``loss``: one of :data:`LOSSES`.

    Both models stay in eval mode (no dropout: the student should match the teacher's
    deterministic outputs); the teacher is never updated.
    """
    check_int(steps, "steps", minimum=1)
    check_positive(lr, "lr")
    check(isinstance(weight_decay, int | float) and weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
    check(rule is None or isinstance(rule, Rule), "rule", rule, "a secateurs.clip Rule (e.g. clip.GlobalNorm(1.0)) or None")
    check_choice(loss, "loss", LOSSES)
    check_int(seed, "seed")
    check(student is not teacher, "student", "the teacher itself", "a separate (pruned) copy of the teacher")
    batches = make_batches(calibration)
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    teacher.eval()
    student.eval()
    targets, kind = _teacher_outputs(teacher, batches, loss)
    params = [p for p in student.parameters() if p.requires_grad]
    check(bool(params), "student", "a model without trainable parameters", "a model with parameters that require grad")
    optimizer = wrap(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), rule)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[torch.Tensor] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        i = order.pop()
        batch = batches[i]
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = _main_output(forward(student, to_device(batch.inputs, device)), kind)
            value = _distance(kind, out, targets[i].to(out.device), batch.valid)
            value.backward()
        optimizer.step()
        losses.append(value.detach())
    optimizer.zero_grad(set_to_none=True)
    return DistillResult(losses=torch.stack(losses).tolist(), log=optimizer.log)


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module, batches: Sequence[Batch], loss: str) -> tuple[list[torch.Tensor], str]:
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    outputs, kind = [], loss
    for batch in batches:
        out = forward(teacher, to_device(batch.inputs, device))
        if kind == "auto" or not outputs:
            kind = _resolve_loss(loss, out)
        outputs.append(_main_output(out, kind).detach())
    return outputs, kind
