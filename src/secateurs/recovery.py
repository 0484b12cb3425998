"""Recovery after structured pruning: a short distillation from the dense model, clipped.

Structured removal (:func:`secateurs.prune.structured_transformer`) loses some of what the dense
model computed; a few hundred optimizer steps of distillation on the calibration data win most
of it back. The pruned *student* learns to reproduce the dense *teacher*'s outputs on the same
batches (no labels): the teacher's next-token distribution (KL divergence) for a model with
``logits``, else its last hidden states (mean squared error, or ``1 - cosine`` per position or of
the mean-pooled sentence embeddings), over the positions that are not padding. The optimizer is
wrapped with :func:`secateurs.clip.wrap`, so any clipping rule of :mod:`secateurs.clip` bounds
the updates (and non-finite steps are skipped).

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

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from secateurs.clip import ClipLog, Rule, wrap
from secateurs.errors import SecateursError, check, check_choice, check_int, check_positive
from secateurs.inputs import forward, to_device
from secateurs.prune.calibration.capture import Batch, make_batches

__all__ = ["LOSSES", "SCHEDULES", "DistillResult", "distill"]

LOSSES = ("auto", "kl", "mse", "cosine", "pooled")
"""``kl``: KL(teacher || student) of the next-token distributions (needs ``logits``); ``mse`` /
``cosine``: mean squared error / ``1 - cosine`` of the last hidden states, per position;
``pooled``: ``1 - cosine`` of each sequence's mean-pooled last hidden state (the mean over its
non-padding positions: the sentence embedding of a mean-pooling embedding model such as
all-MiniLM-L6-v2); ``auto``: ``kl`` when the output has logits, else ``mse``."""

SCHEDULES = ("constant", "cosine", "linear")
"""The learning rate after warm-up: constant, cosine decay to 0, or linear decay to 0."""


@dataclass
class DistillResult:
    """What :func:`distill` did: the loss of every step taken (float, read once at the end), the
    clipping log of its optimizer (norms before/after, clipped and skipped steps), the
    ``(step, loss)`` measurements on the validation batches, and the step whose weights the
    student kept (the best validation measurement; the last step without validation)."""

    losses: list[float]
    log: ClipLog
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    lrs: list[float] = field(default_factory=list)
    """The learning rate of every step taken (the schedule, warm-up included)."""


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
                  "'kl' for models whose output has logits; else 'mse', 'cosine' or 'pooled'")
        return loss
    return "kl" if isinstance(getattr(output, "logits", None), torch.Tensor) else "mse"


def _distance(kind: str, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the non-padding positions of the per-position distance (``pooled``: mean over
    the sequences of the distance between their mean-pooled outputs)."""
    s, t = student.float(), teacher.float()
    if kind == "pooled":
        return (1.0 - F.cosine_similarity(_pool(s, valid), _pool(t, valid), dim=-1)).mean()
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


def _pool(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean over the non-padding positions of each sequence of ``x`` (batch, positions, dim)."""
    if x.dim() < 3:
        return x
    if valid is None or tuple(valid.shape) != tuple(x.shape[:2]):
        return x.mean(1)
    v = valid.to(x.device, x.dtype).unsqueeze(-1)
    return (x * v).sum(1) / v.sum(1).clamp_min(1.0)


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
    layers: str | Sequence[str] | None = None,
    layer_weight: float = 1.0,
    schedule: str = "constant",
    warmup: int = 0,
    validation: Iterable[Any] | None = None,
    eval_every: int = 50,
    patience: int | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Train ``student`` in place for up to ``steps`` AdamW steps to reproduce ``teacher`` on ``calibration``.

    ``calibration``: batches of model inputs (tensors, tuples, or mappings such as tokenizer
    outputs, whose ``attention_mask`` keeps padding out of the loss); the batches are cycled in a
    fresh order (``seed``) each pass, and the teacher runs beside the student on each (no grad),
    so a large calibration set costs no memory for stored targets.
    ``rule``: a :mod:`secateurs.clip` rule (``clip.GlobalNorm(1.0)``, ``clip.build("autoclip")``...)
    applied before every step by :func:`secateurs.clip.wrap`, or None for no clipping (norms are
    still logged, non-finite steps still skipped). ``loss``: one of :data:`LOSSES`, on the final
    output.

    ``layers``: intermediate outputs matched as well (TinyBERT / Minitron style), each by a
    normalised mean squared error ``||s - t||^2 / ||t||^2`` over the non-padding positions, their
    mean weighted by ``layer_weight`` and added to the loss: None (the final output only),
    ``"blocks"`` (the output of every Transformer block, found as
    :func:`secateurs.prune.transformer_parts` finds attention and MLPs; structured pruning keeps
    the residual width, so student and teacher blocks line up) or module names present in both.

    ``schedule``: the learning rate over the steps, one of :data:`SCHEDULES`, after ``warmup``
    steps of linear warm-up from 0. ``weight_decay``: AdamW's decoupled decay.

    ``validation``: held-out batches (never the data the result is judged on): every
    ``eval_every`` steps (and at the start) the final-output loss on them is measured; the student
    ends with the weights of the best measurement, and with ``patience`` training stops after
    that many measurements without improvement (early stopping); ``on_validation(step, loss)`` is
    called after each (progress reports).

    Both models stay in eval mode (no dropout: the student should match the teacher's
    deterministic outputs); the teacher is never updated.
    """
    check_int(steps, "steps", minimum=1)
    check_positive(lr, "lr")
    check(isinstance(weight_decay, int | float) and weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
    check(rule is None or isinstance(rule, Rule), "rule", rule, "a secateurs.clip Rule (e.g. clip.GlobalNorm(1.0)) or None")
    check_choice(loss, "loss", LOSSES)
    check_int(seed, "seed")
    check_choice(schedule, "schedule", SCHEDULES)
    check_int(warmup, "warmup", minimum=0)
    check(warmup < steps, "warmup", warmup, f"fewer warm-up steps than steps ({steps})")
    check(isinstance(layer_weight, int | float) and layer_weight >= 0, "layer_weight", layer_weight, "a number >= 0")
    check_int(eval_every, "eval_every", minimum=1)
    if patience is not None:
        check_int(patience, "patience", minimum=1)
        check(validation is not None, "patience", patience, "None unless validation= batches are given")
    check(student is not teacher, "student", "the teacher itself", "a separate (pruned) copy of the teacher")
    batches = make_batches(calibration)
    held = make_batches(validation) if validation is not None else None
    check(held is None or bool(held), "validation", "no batches", "at least one batch, or None")
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    teacher.eval()
    student.eval()
    names = _matched_layers(teacher, student, layers)
    kind = _resolve_loss(loss, _teacher_forward(teacher, batches[0], device, []))
    params = [p for p in student.parameters() if p.requires_grad]
    check(bool(params), "student", "a model without trainable parameters", "a model with parameters that require grad")
    optimizer = wrap(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), rule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(schedule, warmup, steps))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[torch.Tensor] = []
    lrs: list[float] = []
    checks: list[tuple[int, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (float("inf"), 0, None)
    stale = 0
    t_mods, s_mods = _modules(teacher, names), _modules(student, names)
    for step in range(steps + 1):
        if held is not None and (step % eval_every == 0 or step == steps):
            value = _validate(student, teacher, held, kind, device)
            checks.append((step, value))
            if on_validation is not None:
                on_validation(step, value)
            if value < best[0]:
                best, stale = (value, step, {k: v.detach().clone() for k, v in student.state_dict().items()}), 0
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
        if step == steps:
            break
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        batch = batches[order.pop()]
        inputs = to_device(batch.inputs, device)
        t_inner: list[torch.Tensor] = []
        target = _main_output(_teacher_forward(teacher, batch, device, t_inner, t_mods), kind)
        optimizer.zero_grad(set_to_none=True)
        s_inner: list[torch.Tensor] = []
        handles = [m.register_forward_hook(_keep_first(s_inner)) for m in s_mods]
        try:
            with torch.enable_grad():
                out = _main_output(forward(student, inputs), kind)
                value = _distance(kind, out, target.to(out.device), batch.valid)
                if names and layer_weight:
                    inner = [_relative_mse(s, t.to(s.device), batch.valid) for s, t in zip(s_inner, t_inner, strict=True)]
                    value = value + layer_weight * torch.stack(inner).mean()
                value.backward()
        finally:
            for h in handles:
                h.remove()
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
        losses.append(value.detach())
    optimizer.zero_grad(set_to_none=True)
    if best[2] is not None:
        student.load_state_dict(best[2])
    return DistillResult(losses=torch.stack(losses).tolist() if losses else [], log=optimizer.log,
                         validation=checks, best_step=best[1] if held is not None else len(losses), lrs=lrs)


def _lr_factor(schedule: str, warmup: int, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        done = (step - warmup) / max(steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * done)) if schedule == "cosine" else max(0.0, 1.0 - done)
    return factor


def _keep_first(into: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        into.append(output if isinstance(output, torch.Tensor) else _first_tensor(output))
    return hook


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    value = getattr(output, "last_hidden_state", None)
    if isinstance(value, torch.Tensor):
        return value
    raise SecateursError(f"layers: a matched module returned {type(output).__name__}, which holds no tensor; "
                         "allowed: modules returning a tensor or a tuple with one")


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``sum ||s - t||^2 / sum ||t||^2`` over the non-padding positions."""
    s, t = student.float(), teacher.float()
    err, ref = (s - t).square().sum(-1), t.square().sum(-1)
    if valid is not None and tuple(err.shape) == tuple(valid.shape):
        v = valid.to(err.device, err.dtype)
        err, ref = err * v, ref * v
    return err.sum() / ref.sum().clamp_min(1e-12)


def _block_names(model: nn.Module) -> list[str]:
    """The Transformer blocks: the ``nn.ModuleList`` items that hold an attention layer or an MLP."""
    from secateurs.prune.surgery.transformer import transformer_parts

    lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found: list[str] = []
    owners = [p.name for p in transformer_parts(model)]
    owners += [n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer)]
    for name in owners:
        pieces = name.split(".")
        for i in range(len(pieces), 0, -1):
            if pieces[i - 1].isdigit() and ".".join(pieces[: i - 1]) in lists:
                block = ".".join(pieces[:i])
                if block not in found:
                    found.append(block)
                break
    order = [n for n, _ in model.named_modules()]
    return sorted(found, key=order.index)


def _matched_layers(teacher: nn.Module, student: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return []
    if isinstance(layers, str):
        check(layers == "blocks", "layers", layers, "None, 'blocks', or a list of module names")
        names = _block_names(teacher)
        check(bool(names), "layers", layers, "a model with Transformer blocks (an nn.ModuleList of them), or module names")
        return names
    names = list(layers)
    t, s = dict(teacher.named_modules()), dict(student.named_modules())
    for name in names:
        check(isinstance(name, str) and name in t and name in s, "layers", name,
              "names of modules present in both the teacher and the student")
    return names


def _modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    table = dict(model.named_modules())
    return [table[n] for n in names]


@torch.no_grad()
def _teacher_forward(teacher: nn.Module, batch: Batch, device: torch.device, inner: list[torch.Tensor],
                     modules: Sequence[nn.Module] = ()) -> Any:
    t_device = next((p.device for p in teacher.parameters()), device)
    handles = [m.register_forward_hook(_keep_first(inner)) for m in modules]
    try:
        return forward(teacher, to_device(batch.inputs, t_device))
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _validate(student: nn.Module, teacher: nn.Module, held: Sequence[Batch], kind: str, device: torch.device) -> float:
    total, weight = 0.0, 0.0
    for batch in held:
        target = _main_output(_teacher_forward(teacher, batch, device, []), kind)
        out = _main_output(forward(student, to_device(batch.inputs, device)), kind)
        if kind == "pooled":
            n = float(len(out)) if out.dim() >= 3 else 1.0
        else:
            n = float(batch.valid.sum()) if batch.valid is not None else 1.0
        total += float(_distance(kind, out, target.to(out.device), batch.valid)) * n
        weight += n
    return total / max(weight, 1e-12)


