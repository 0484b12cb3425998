"""Structured pruning of Transformers: whole attention heads (GQA: whole KV groups) and MLP neurons.

:func:`structured_transformer` recognises the blocks of a Transformer by their module structure,
without importing ``transformers``:

- Hugging Face LLaMA family (LLaMA, Mistral, Qwen2, ...): ``self_attn.{q,k,v,o}_proj`` and
  ``mlp.{gate,up,down}_proj``; heads are removed a KV group at a time (a key/value head with the
  query heads that read it), so grouped-query attention never splits a group.
- Hugging Face BERT family (BERT, RoBERTa, MiniLM, ...): ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and ``output.dense``.
- ``torch.nn.TransformerEncoderLayer``: ``linear1``/``linear2`` neurons, and heads of its
  ``self_attn`` (the ``nn.MultiheadAttention`` is replaced by :class:`PrunedMultiheadAttention`,
  which keeps ``embed_dim`` while holding fewer heads; ``nn.MultiheadAttention`` ties the two).

Every layer loses the same number of heads and neurons, because the Hugging Face formats hold
one number per model (LLaMA: ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``; BERT: ``intermediate_size``); the config is patched to the new shapes
(``head_dim`` is written explicitly), so ``save_pretrained`` writes a folder that stock
``from_pretrained`` loads. BERT's head count can be written only with the hidden size: BERT
derives the head size as ``hidden_size // num_attention_heads`` and transformers 5 dropped
``pruned_heads``, so a BERT model with heads removed loads only when ``hidden=`` removes the
same share of the residual width; otherwise it is exact and fast in memory, is saved with
:func:`secateurs.prune.save_structured`, and its ``save_pretrained`` is refused (see
:func:`check_pretrained`). ``hidden=`` removes residual-stream dims everywhere at once.

Scores (``criterion``, a name from :data:`UNIT_CRITERIA`): ``magnitude`` (L2 norm of every
weight a unit owns), ``taylor`` (``sum |w * dL/dw|`` over those weights, gradients summed over
the calibration batches), ``activation`` (``sum ||W_out[:, c]||^2 E[x_c^2]``: the output energy
of the unit's columns, Wanda's score per column) and ``fluctuation`` (FLAP's
``sum ||W_out[:, c]||^2 Var[x_c]``: the part that a bias cannot absorb). ``reconstruct="bias"``
folds the removed columns' mean contribution into the next layer's bias (FLAP);
``reconstruct="lstsq"`` refits the next layer's kept columns and bias by least squares on the
calibration inputs.

>>> import torch
>>> from torch import nn
>>> layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
>>> small = structured_transformer(nn.TransformerEncoder(layer, 2), sparsity=0.5)
>>> small.layers[0].self_attn.num_heads, small.layers[0].linear1.out_features
(2, 32)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from secateurs.errors import SecateursError, check, check_choice, check_fraction, check_int
from secateurs.inputs import forward, to_device
from secateurs.prune.calibration.capture import Batch, make_batches
from secateurs.prune.surgery.cut import RECORD_ATTR
from secateurs.registry import Registry

__all__ = [
    "RECONSTRUCT",
    "UNIT_CRITERIA",
    "Part",
    "PrunedMultiheadAttention",
    "UnitCriterion",
    "UnitStats",
    "check_pretrained",
    "register_unit_criterion",
    "structured_transformer",
    "transformer_parts",
]

RECONSTRUCT = ("bias", "lstsq")
"""``bias``: the next layer's bias absorbs the removed columns' mean (FLAP); ``lstsq``: the next
layer's kept columns and bias are refitted by least squares on the calibration inputs."""

GQA_UNITS = ("kv_group", "query")
"""``kv_group``: a unit is a key/value head with its query heads; ``query``: a unit is one query
head, the same number removed from every KV group (all key/value heads kept)."""


# ---------------------------------------------------------------------------------- the parts


@dataclass
class Part:
    """One prunable place: the heads of one attention layer, or the neurons of one MLP.

    Unit ``u`` owns rows ``rows[i][1][u]`` of each producing linear ``rows[i][0]`` and columns
    ``cols[1][u]`` of the consuming linear ``cols[0]`` (the one that reads them).
    """

    name: str
    kind: str
    """``"heads"`` or ``"neurons"``."""
    family: str
    """``"llama"``, ``"bert"`` or ``"torch"``."""
    owner: nn.Module
    rows: list[tuple[nn.Linear, torch.Tensor]]
    cols: tuple[nn.Linear, torch.Tensor]
    units: int
    groups: int = 1
    """Units come in this many equal blocks that must stay equal (query heads per KV group)."""
    head_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def consumer(self) -> nn.Linear:
        return self.cols[0]


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _blocks(total: int, size: int) -> torch.Tensor:
    """``(total // size, size)``: unit ``u`` owns ``u*size .. (u+1)*size - 1``."""
    return torch.arange(total).reshape(-1, size)


def _llama_parts(name: str, module: nn.Module, gqa: str) -> list[Part]:
    q, k, v, o = (_linear(module, f"{p}_proj") for p in "qkvo")
    assert q is not None and k is not None and v is not None and o is not None
    head_dim = int(module.head_dim)
    heads = q.out_features // head_dim
    kv = k.out_features // head_dim
    rep = heads // kv
    if gqa == "kv_group":
        qrows = _blocks(q.out_features, rep * head_dim)
        rows = [(q, qrows), (k, _blocks(k.out_features, head_dim)), (v, _blocks(v.out_features, head_dim))]
        return [Part(name, "heads", "llama", module, rows, (o, qrows), kv, head_dim=head_dim,
                     extra={"rep": rep})]
    qrows = _blocks(q.out_features, head_dim)
    return [Part(name, "heads", "llama", module, [(q, qrows)], (o, qrows), heads, groups=kv, head_dim=head_dim,
                 extra={"rep": rep})]


def _bert_parts(name: str, attention: nn.Module) -> list[Part]:
    attn = attention.self
    q, k, v = attn.query, attn.key, attn.value
    o = attention.output.dense
    head_dim = int(attn.attention_head_size)
    blocks = _blocks(q.out_features, head_dim)
    return [Part(name, "heads", "bert", attn, [(q, blocks), (k, blocks), (v, blocks)], (o, blocks),
                 q.out_features // head_dim, head_dim=head_dim)]


def _mha_parts(name: str, mha: nn.Module) -> list[Part]:
    if not isinstance(mha, PrunedMultiheadAttention):
        return []
    head_dim = mha.head_dim
    blocks = _blocks(mha.q_proj.out_features, head_dim)
    rows = [(mha.q_proj, blocks), (mha.k_proj, blocks), (mha.v_proj, blocks)]
    return [Part(name, "heads", "torch", mha, rows, (mha.out_proj, blocks), mha.num_heads, head_dim=head_dim)]


def _neurons(name: str, family: str, owner: nn.Module, producers: Sequence[nn.Linear], consumer: nn.Linear) -> Part:
    n = consumer.in_features
    idx = torch.arange(n).reshape(n, 1)
    return Part(name, "neurons", family, owner, [(p, idx) for p in producers], (consumer, idx), n)


def transformer_parts(model: nn.Module, *, gqa: str = "kv_group") -> list[Part]:
    """The attention layers and MLPs :func:`structured_transformer` would prune, in model order.

    ``nn.TransformerEncoderLayer`` attention shows up only after its ``self_attn`` has been
    replaced by :class:`PrunedMultiheadAttention` (which :func:`structured_transformer` does).
    """
    parts: list[Part] = []
    for name, module in model.named_modules():
        if all(_linear(module, f"{p}_proj") is not None for p in "qkvo") and hasattr(module, "head_dim"):
            parts.extend(_llama_parts(name, module, gqa))
        elif all(_linear(module, p) is not None for p in ("gate_proj", "up_proj", "down_proj")):
            parts.append(_neurons(name, "llama", module, [module.gate_proj, module.up_proj], module.down_proj))
        elif (all(_linear(getattr(module, "self", None), p) is not None for p in ("query", "key", "value"))
              and _linear(getattr(module, "output", None), "dense") is not None
              and hasattr(module.self, "attention_head_size")):
            parts.extend(_bert_parts(name, module))
        elif (_linear(getattr(module, "intermediate", None), "dense") is not None
              and _linear(getattr(module, "output", None), "dense") is not None):
            parts.append(_neurons(name, "bert", module, [module.intermediate.dense], module.output.dense))
        elif isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            parts.append(_neurons(name, "torch", module, [module.linear1], module.linear2))
        elif isinstance(module, PrunedMultiheadAttention):
            parts.extend(_mha_parts(name, module))
    return parts


# ------------------------------------------------------------- nn.MultiheadAttention with fewer heads


class PrunedMultiheadAttention(nn.Module):
    """Self-attention with ``num_heads`` heads of ``head_dim`` and a residual width ``embed_dim``
    that need not be ``num_heads * head_dim``: what ``nn.MultiheadAttention`` becomes when heads
    are removed without touching the residual stream. Same call as ``nn.MultiheadAttention``
    (query, key, value, ``key_padding_mask``, ``attn_mask``, ``need_weights`` (only False),
    ``is_causal``); separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears.
    """

    # What nn.TransformerEncoderLayer reads before it calls us: no fused fast path.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise SecateursError(
                "model: nn.MultiheadAttention(add_bias_kv=True or add_zero_attn=True) heads cannot be "
                "removed; allowed: attention without bias_k/bias_v and add_zero_attn"
            )
        e, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            setattr(self, name, lin)
        out = mha.out_proj
        self.out_proj = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None,
                                  device=out.weight.device, dtype=out.weight.dtype)
        self.out_proj.load_state_dict(out.state_dict())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise SecateursError("need_weights: got True; allowed: False (pruned attention returns no weights)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, t, _ = query.shape
        s = key.shape[1]
        q = self.q_proj(query).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, b, t, s)
        causal = is_causal and mask is None
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(1)), None


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype,
                 b: int, t: int, s: int) -> torch.Tensor | None:
    """One additive float mask broadcastable to ``(b, heads, t, s)``, as nn.MultiheadAttention
    combines them (True = not attended)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(1, 1, t, s) if mask.dim() == 2 else mask.view(b, -1, t, s)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(b, 1, 1, s)
        mask = pad if mask is None else mask + pad
    return mask


def _replace_mha(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) and isinstance(
                module.self_attn, nn.MultiheadAttention):
            module.self_attn = PrunedMultiheadAttention(module.self_attn)


# ------------------------------------------------------------------------------- statistics


@dataclass
class UnitStats:
    """What the consumer of a part (``o_proj``, ``down_proj``) sees on the calibration data:
    per input column the sum and the sum of squares, and ``sum x x^T`` when asked (float64)."""

    rows: int
    total: torch.Tensor
    square: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.square / max(self.rows, 1) - self.mean.square()).clamp_min(0)


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needs has been recorded."""


def _collect(model: nn.Module, parts: Sequence[Part], batches: Sequence[Batch], *, gram: bool,
             grads: Callable[[Any, Any], torch.Tensor] | None, stop: nn.Module | None = None) -> dict[str, UnitStats]:
    """Consumer-input statistics of every part over the batches (padding skipped); with
    ``grads``, also ``loss.backward()`` per batch so that ``.grad`` sums over them. Without
    ``grads``, a forward ends as soon as ``stop``'s input has been recorded (sequential
    calibration runs only the blocks up to the part it calibrates)."""
    stats: dict[str, UnitStats] = {}
    valid: list[torch.Tensor | None] = [None]

    def hook_for(part: Part) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = _valid_rows(args[0], valid[0])
            s = stats.get(part.name + "/" + part.kind)
            if s is None:
                c = x.shape[1]
                s = stats[part.name + "/" + part.kind] = UnitStats(
                    0, x.new_zeros(c), x.new_zeros(c), x.new_zeros(c, c) if gram else None)
            s.rows += x.shape[0]
            s.total += x.sum(0)
            s.square += x.square().sum(0)
            if s.gram is not None:
                s.gram.addmm_(x.T, x)
        return hook

    handles = [p.consumer.register_forward_pre_hook(hook_for(p)) for p in parts]
    if stop is not None and grads is None:
        def halt(_module: nn.Module, _args: tuple) -> None:
            raise _Stop
        handles.append(stop.register_forward_pre_hook(halt))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            valid[0] = batch.valid
            inputs = to_device(batch.inputs, device)
            if grads is None:
                with torch.no_grad(), contextlib.suppress(_Stop):
                    forward(model, inputs)
            else:
                with torch.enable_grad():
                    grads(forward(model, inputs), inputs).backward()
    finally:
        for h in handles:
            h.remove()
    return stats


def default_loss(output: Any, inputs: Any) -> torch.Tensor:
    """The loss the gradient criteria use when none is given: the model's own ``loss``, else the
    next-token cross-entropy of ``logits`` on ``input_ids`` (a causal LM)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(output, "logits", None)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if isinstance(logits, torch.Tensor) and isinstance(ids, torch.Tensor) and logits.dim() == 3:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))
    raise SecateursError(
        "loss_fn: got None, and the model's output has neither a loss nor next-token logits; allowed: "
        "a function (output, inputs) -> scalar loss"
    )


# -------------------------------------------------------------------------------- criteria


UNIT_CRITERIA: Registry[UnitCriterion] = Registry("unit criterion", field="criterion")
"""Scores of whole heads / KV groups / neurons (name -> class); low scores are removed first."""

register_unit_criterion = UNIT_CRITERIA.register
"""Class decorator: ``@register_unit_criterion("name")`` makes a :class:`UnitCriterion` available by name."""


class UnitCriterion:
    """One score per unit of a :class:`Part`. ``needs_data``: reads consumer statistics from the
    calibration batches; ``needs_grad``: reads ``.grad`` summed over them."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False

    def __call__(self, part: Part, stats: UnitStats | None) -> torch.Tensor:
        raise NotImplementedError


def _owned(part: Part) -> Iterable[tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor]]:
    """(param, grad, dim, index (units, k)) of every weight slice a unit owns."""
    consumer, cidx = part.cols
    for lin, idx in part.rows:
        yield lin.weight, lin.weight.grad, 0, idx
        if lin.bias is not None:
            yield lin.bias, lin.bias.grad, 0, idx
    yield consumer.weight, consumer.weight.grad, 1, cidx


def _per_unit(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``sum`` of ``t`` over each unit's slice along ``dim``: shape (units,)."""
    picked = t.detach().to(torch.float64).index_select(dim, idx.flatten().to(t.device))
    if dim == 1:
        picked = picked.T
    return picked.reshape(idx.shape[0], -1).sum(1).cpu()


@register_unit_criterion("magnitude")
class UnitMagnitude(UnitCriterion):
    """L2 norm of every weight a unit owns: its rows of the query/key/value (gate/up) linears and
    its columns of the output (down) linear."""

    def __call__(self, part: Part, stats: UnitStats | None) -> torch.Tensor:
        return sum(_per_unit(w.square(), dim, idx) for w, _, dim, idx in _owned(part)).sqrt()  # type: ignore[union-attr]


@register_unit_criterion("taylor")
class UnitTaylor(UnitCriterion):
    """First-order Taylor estimate of the loss change: ``sum |w * dL/dw|`` over the unit's
    weights, gradients summed over the calibration batches."""

    needs_grad = True

    def __call__(self, part: Part, stats: UnitStats | None) -> torch.Tensor:
        total = torch.zeros(part.units, dtype=torch.float64)
        for w, g, dim, idx in _owned(part):
            if g is not None:
                total += _per_unit((w.detach() * g).abs(), dim, idx)
        return total


def _column_energy(part: Part, per_column: torch.Tensor) -> torch.Tensor:
    consumer, idx = part.cols
    norms = consumer.weight.detach().to(torch.float64).square().sum(0).cpu()
    return (norms * per_column.cpu())[idx].sum(1)


@register_unit_criterion("activation")
class UnitActivation(UnitCriterion):
    """``sum ||W_out[:, c]||^2 E[x_c^2]`` over the unit's columns: the energy it adds to the
    output (Wanda's per-column score, summed)."""

    needs_data = True

    def __call__(self, part: Part, stats: UnitStats | None) -> torch.Tensor:
        assert stats is not None
        return _column_energy(part, stats.square / max(stats.rows, 1))


@register_unit_criterion("fluctuation")
class UnitFluctuation(UnitCriterion):
    """FLAP's fluctuation ``sum ||W_out[:, c]||^2 Var[x_c]``: what is lost once the unit's mean is
    folded into the bias (use with ``reconstruct="bias"``)."""

    needs_data = True

    def __call__(self, part: Part, stats: UnitStats | None) -> torch.Tensor:
        assert stats is not None
        return _column_energy(part, stats.variance)


# ---------------------------------------------------------------------------------- surgery


def _keep_rows(lin: nn.Linear, keep: torch.Tensor) -> None:
    keep = keep.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(0, keep).contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data.index_select(0, keep).contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(keep)


def _keep_cols(lin: nn.Linear, keep: torch.Tensor) -> None:
    keep = keep.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(1, keep).contiguous(), requires_grad=lin.weight.requires_grad)
    lin.in_features = len(keep)


def _add_bias(lin: nn.Linear) -> None:
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))


def _reconstruct(part: Part, full: torch.Tensor, keep_cols: torch.Tensor, stats: UnitStats, how: str) -> None:
    """Fold what the removed columns contributed on the calibration data into the consumer
    (already cut to ``keep_cols``; ``full`` is its weight before the cut)."""
    lin = part.consumer
    w = full.to(torch.float64)
    drop = torch.ones(w.shape[1], dtype=torch.bool)
    drop[keep_cols] = False
    if how == "bias":
        with torch.no_grad():
            shift = w[:, drop.to(w.device)] @ stats.mean[drop].to(w.device)
            lin.bias.add_(shift.to(lin.bias.dtype))
        return
    assert stats.gram is not None
    weights, bias = least_squares_refit(w, lin.bias.detach().to(torch.float64), stats, keep_cols)
    with torch.no_grad():
        lin.weight.copy_(weights.to(lin.weight.dtype))
        lin.bias.copy_(bias.to(lin.bias.dtype))


def least_squares_refit(weight: torch.Tensor, bias: torch.Tensor, stats: UnitStats, keep: torch.Tensor,
                        damping: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` minimising ``sum ||x_K W'^T + b' - (x W^T + b)||^2`` over the calibration rows
    ``x`` (their Gram matrix and sums in ``stats``), for the kept columns ``keep``: the normal
    equations of ``[x_K, 1]``, with ``damping * mean(diag)`` added to the diagonal."""
    assert stats.gram is not None
    c = weight.shape[1]
    n = float(stats.rows)
    gram = torch.zeros(c + 1, c + 1, dtype=torch.float64)
    gram[:c, :c] = stats.gram.cpu()
    gram[:c, c] = gram[c, :c] = stats.total.cpu()
    gram[c, c] = n
    theta = torch.cat([weight.T.cpu(), bias.reshape(1, -1).cpu()])  # (c + 1, out)
    kk = torch.cat([keep.cpu(), torch.tensor([c])])
    a = gram[kk][:, kk]
    a = a + torch.eye(len(kk), dtype=torch.float64) * damping * a.diagonal().mean()
    solution = torch.linalg.solve(a, gram[kk] @ theta)  # (k + 1, out)
    return solution[:-1].T.to(weight.device), solution[-1].to(weight.device)


def _cut(part: Part, remove: torch.Tensor) -> torch.Tensor:
    """Remove units ``remove`` from every linear of the part; returns the kept consumer columns."""
    keep_units = torch.tensor(sorted(set(range(part.units)) - set(remove.tolist())), dtype=torch.long)
    for lin, idx in part.rows:
        _keep_rows(lin, idx[keep_units].flatten())
    consumer, cidx = part.cols
    keep_cols = cidx[keep_units].flatten()
    _keep_cols(consumer, keep_cols)
    kept = len(keep_units)
    owner = part.owner
    if part.kind == "heads":
        if part.family == "llama":
            rep = part.extra["rep"]
            kv_heads = kept if part.groups == 1 else part.groups
            q_heads = kept * rep if part.groups == 1 else kept
            owner.num_key_value_groups = q_heads // kv_heads
            part.extra.update(q_heads=q_heads, kv_heads=kv_heads)
        elif part.family == "bert":
            owner.num_attention_heads = kept
            owner.all_head_size = kept * part.head_dim
        else:
            owner.num_heads = kept
    return keep_cols


def _select(part: Part, scores: torch.Tensor, fraction: float, round_to: int, field_name: str) -> torch.Tensor:
    """The lowest-scoring units to remove: the same count from each of ``part.groups`` blocks."""
    per = part.units // part.groups
    keep = int(per * (1.0 - fraction) + 0.5)
    if round_to > 1 and part.kind == "neurons":
        keep = min(per, max(round_to, round(keep / round_to) * round_to)) if per >= round_to else keep
    if part.kind == "heads" and part.family == "llama" and keep >= 1:
        keep = _loadable_heads(part, keep)
    if part.kind == "neurons":
        what = "neurons"
    elif part.groups > 1:
        what = "query heads of each KV group"
    else:
        what = "KV groups" if part.extra.get("rep", 1) > 1 else "heads"
    if keep < 1:
        most = (per - 1) / per
        raise SecateursError(
            f"{field_name}: got {fraction}; it would remove all {per} {what} of layer {part.name!r}; "
            f"allowed: at most {most:.4g} (one of {per} kept)", field=field_name)
    s = scores.reshape(part.groups, per)
    order = torch.argsort(s, dim=1, stable=True)[:, : per - keep]
    return (order + torch.arange(part.groups).reshape(-1, 1) * per).flatten()


def _loadable_heads(part: Part, keep: int) -> int:
    """The kept units nearest ``keep`` (ties: more kept) whose query-head count divides
    ``hidden_size``, which LLaMA-family configs require even with an explicit ``head_dim``."""
    hidden = getattr(getattr(part.owner, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return keep
    per = part.units // part.groups
    queries = (lambda k: k * part.extra["rep"]) if part.groups == 1 else (lambda k: k * part.groups)
    valid = [k for k in range(1, per + 1) if hidden % queries(k) == 0] or [per]
    return min(valid, key=lambda k: (abs(k - keep), -k))


# --------------------------------------------------------------------------- the hidden size


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    return (isinstance(module, nn.LayerNorm | nn.RMSNorm) or kind.endswith(("LayerNorm", "RMSNorm"))) and (
        isinstance(weight, torch.Tensor) and tuple(weight.shape) == (width,))


def _check_hidden_family(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    families = {p.family for p in transformer_parts(model)}
    check(config is not None and isinstance(getattr(config, "hidden_size", None), int) and bool(families)
          and families <= {"llama", "bert"}, "hidden", f"a {type(model).__name__}",
          "a Hugging Face LLaMA- or BERT-family model (a config with hidden_size); hidden=None for others")


def _residual_sites(model: nn.Module, width: int) -> tuple[list[tuple[nn.Parameter, int]], list[nn.Module]]:
    """Every (parameter, dim) of the residual stream, the ``width``-wide activations every block
    reads and adds to: embedding columns, every norm's gain and bias, the input columns of the
    linears that read it (query/key/value, gate/up, the MLP's first linear, LM head, pooler) and
    the output rows of those that write it (attention output, MLP output, pooler); and the norms."""
    sites: list[tuple[nn.Parameter, int]] = []
    in_parts: set[int] = set()

    def reads(lin: nn.Linear) -> None:
        in_parts.add(id(lin))
        sites.append((lin.weight, 1))

    def writes(lin: nn.Linear) -> None:
        in_parts.add(id(lin))
        sites.append((lin.weight, 0))
        if lin.bias is not None:
            sites.append((lin.bias, 0))

    for part in transformer_parts(model):
        for lin, _ in part.rows:
            reads(lin)
        if part.family == "llama" and part.kind == "heads":
            for lin in (part.owner.k_proj, part.owner.v_proj):
                if id(lin) not in in_parts:
                    reads(lin)
        writes(part.consumer)
    norms = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.embedding_dim == width:
            sites.append((module.weight, 1))
        elif _is_norm(module, width):
            norms.append(module)
            sites.append((module.weight, 0))
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                sites.append((module.bias, 0))
        elif isinstance(module, nn.Linear):
            if id(module) in in_parts:
                continue
            if module.in_features == width:
                sites.append((module.weight, 1))
            if module.out_features == width:
                sites.append((module.weight, 0))
                if module.bias is not None:
                    sites.append((module.bias, 0))
        elif any(width in p.shape for p in module.parameters(recurse=False)):
            raise SecateursError(
                f"hidden: module {name!r} ({type(module).__name__}) holds a parameter as wide as the hidden size "
                f"({width}) that is none of embedding, norm or linear; allowed: hidden=None for this model", field="hidden")
    return sites, norms


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input as float64 rows of its last dim, without the padding positions ``mask``
    leaves out (when ``mask`` has the input's leading shape)."""
    x = x.detach()
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _residual_energy(model: nn.Module, norms: Sequence[nn.Module], batches: Sequence[Batch]) -> torch.Tensor:
    """Mean over the norms' inputs (the residual stream before every block part and at the end)
    of ``E[x_d^2]`` per hidden dim, padding skipped."""
    total: list[torch.Tensor] = []
    rows = [0]
    valid: list[torch.Tensor | None] = [None]

    def hook(_module: nn.Module, args: tuple) -> None:
        x = _valid_rows(args[0], valid[0])
        total.append(x.square().sum(0).cpu())
        rows[0] += x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            for batch in batches:
                valid[0] = batch.valid
                forward(model, to_device(batch.inputs, device))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(total).sum(0) / max(rows[0], 1)


def _prune_hidden(model: nn.Module, fraction: float, batches: Sequence[Batch] | None, round_to: int) -> dict[str, Any]:
    """Remove ``fraction`` of the residual-stream width from every place that holds it at once;
    patch ``config.hidden_size``. Score of a dim: the L2 norm of every weight that reads or writes
    it, times (with calibration data) the RMS of the residual stream on it."""
    config = model.config
    width = int(config.hidden_size)
    sites, norms = _residual_sites(model, width)
    squares = torch.zeros(width, dtype=torch.float64)
    for param, dim in sites:
        w = param.detach().to(torch.float64).square()
        squares += (w if w.dim() == 1 else w.sum(1 - dim)).cpu()
    scores = squares.sqrt()
    if batches is not None and norms:
        scores = scores * _residual_energy(model, norms, batches).sqrt()
    keep = int(width * (1.0 - fraction) + 0.5)
    step = round_to
    family = {p.family for p in transformer_parts(model)}
    if "llama" in family:
        # LlamaConfig refuses a hidden_size that is no multiple of num_attention_heads.
        step = math.lcm(step, int(config.num_attention_heads))
    if step > 1:
        keep = min(width, max(step, round(keep / step) * step)) if width >= step else keep
    check(keep >= 1, "hidden", fraction, f"at most {(width - 1) / width:.4g} (one of {width} dims kept)")
    kept = torch.sort(torch.argsort(scores, descending=True, stable=True)[:keep]).values
    _cut_sites(model, sites, kept)
    config.hidden_size = keep
    if "llama" in family:
        config.head_dim = int(next(p for p in transformer_parts(model) if p.kind == "heads").head_dim)
    return {"units": width, "kept": keep, "removed": sorted(set(range(width)) - set(kept.tolist()))}


def _cut_sites(model: nn.Module, sites: Sequence[tuple[nn.Parameter, int]], keep: torch.Tensor) -> None:
    """Keep indices ``keep`` along every (parameter, dim); a parameter shared by several modules
    (tied embeddings) is cut once and stays shared."""
    dims: dict[int, tuple[nn.Parameter, set[int]]] = {}
    for param, dim in sites:
        dims.setdefault(id(param), (param, set()))[1].add(dim)
    new: dict[int, nn.Parameter] = {}
    for key, (param, which) in dims.items():
        data = param.data
        for d in sorted(which):
            data = data.index_select(d, keep.to(data.device))
        new[key] = nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[name] = new[id(param)]
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        elif hasattr(module, "normalized_shape") and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.normalized_shape = tuple(module.weight.shape)


# ------------------------------------------------------------------------------- the config


def _patch_config(model: nn.Module, parts: Sequence[Part], biased: set[str]) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    heads = [p for p in parts if p.kind == "heads" and p.family == "llama"]
    neurons = [p for p in parts if p.kind == "neurons"]
    if heads and "q_heads" in heads[0].extra:
        config.num_attention_heads = heads[0].extra["q_heads"]
        config.num_key_value_heads = heads[0].extra["kv_heads"]
        config.head_dim = heads[0].head_dim
    if neurons and neurons[0].family in ("llama", "bert"):
        config.intermediate_size = neurons[0].consumer.in_features
    bert_heads = [p for p in transformer_parts(model) if p.kind == "heads" and p.family == "bert"]
    if bert_heads:
        kept, size = bert_heads[0].owner.num_attention_heads, bert_heads[0].head_dim
        if kept * size == config.hidden_size:
            # BERT's head size is hidden_size // num_attention_heads: the count can be written.
            config.num_attention_heads = kept
        else:
            # Not loadable by stock transformers (see check_pretrained): say so in the config too.
            config.secateurs_attention_heads = kept
            config.secateurs_head_dim = size
    if "attention" in biased:
        config.attention_bias = True
    if "mlp" in biased:
        config.mlp_bias = True


def check_pretrained(model: nn.Module) -> None:
    """Raise :class:`SecateursError` unless ``model.save_pretrained`` writes a folder that stock
    ``from_pretrained`` loads to the same shapes: every linear matches what its config implies.

    BERT-family attention fails unless ``heads x head size == hidden_size``: transformers 5.24's
    ``BertSelfAttention.__init__`` sets ``self.attention_head_size = int(config.hidden_size /
    config.num_attention_heads)`` and builds ``query``/``key``/``value`` as
    ``nn.Linear(config.hidden_size, num_attention_heads * attention_head_size)``, and reads no
    ``head_dim``, ``attention_head_size`` or ``pruned_heads`` field (transformers 5 dropped
    ``pruned_heads``), so the attention is always as wide as the residual stream. Removing heads
    therefore loads only together with the same share of the hidden size (``hidden=`` equal to
    ``heads=``: 12 heads of 32 on 384 -> 9 heads of 32 on 288).
    """
    config = getattr(model, "config", None)
    check(config is not None, "model", type(model).__name__, "a Hugging Face model (with a config)")
    got = getattr(config, "secateurs_attention_heads", None)
    if got is not None:
        size = getattr(config, "secateurs_head_dim", None)
        need = got * size if size else None
        raise SecateursError(
            f"model: BERT-family attention with {got} heads of {size} per layer on hidden_size {config.hidden_size} "
            "cannot be written in the Hugging Face format: transformers builds every head of size "
            "hidden_size // num_attention_heads (BertSelfAttention.__init__: attention_head_size = "
            "int(config.hidden_size / config.num_attention_heads)) and transformers 5 removed pruned_heads; "
            f"allowed: hidden= the same fraction as heads= (so that hidden_size = {got} x {size} = {need}), "
            "heads=0 (MLP neurons only), or secateurs.prune.save_structured / load_structured for this model"
        )


# ----------------------------------------------------------------------------- the entry point


def structured_transformer(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    heads: float | None = None,
    neurons: float | None = None,
    criterion: str | UnitCriterion = "magnitude",
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    reconstruct: str | None = None,
    gqa: str = "kv_group",
    round_to: int = 1,
    hidden: float | None = None,
    sequential: bool = True,
) -> nn.Module:
    """Return a copy of the Transformer ``model`` with whole heads and MLP neurons removed.

    ``sparsity`` is the fraction of heads and of neurons removed from every layer; ``heads`` and
    ``neurons`` override it for one kind (``0`` leaves that kind alone). Every layer loses the
    same count (the Hugging Face formats hold one count per model: transformers 5.24 builds
    LLaMA and BERT layers from the global config and ignores ``per_layer_config``), rounded to
    the nearest whole unit; ``round_to`` keeps the neuron count a multiple of it (for fast
    kernels). LLaMA-family configs also require ``hidden_size`` to be a multiple of
    ``num_attention_heads``, so the head count is rounded to the nearest count that is (ties:
    fewer heads removed); ``pruning_record(result)`` has what was removed.

    Attention heads go whole: all of a head's query, key and value rows and its output columns.
    With grouped-query attention (``num_key_value_heads < num_attention_heads``), ``gqa="kv_group"``
    removes whole KV groups (a key/value head and every query head reading it), so with 2 KV
    heads the only head sparsity is 0.5; ``gqa="query"`` removes the same number of query heads
    from every group and keeps all key/value heads. Gated MLPs lose gate and up rows together.

    ``criterion``: a name from :data:`UNIT_CRITERIA` (``magnitude``, ``taylor``,
    ``activation``, ``fluctuation``) or a :class:`UnitCriterion`. ``calibration`` (batches of
    model inputs, e.g. tokenizer outputs: their ``attention_mask`` marks padding, which is
    skipped) is needed by ``taylor``, ``activation``, ``fluctuation`` and by ``reconstruct``;
    ``taylor`` uses ``loss_fn(output, inputs)`` (default: the model's loss, or next-token
    cross-entropy for a causal LM). ``reconstruct``: None, ``"bias"`` (the next layer's bias
    absorbs the removed units' mean output, FLAP) or ``"lstsq"`` (the next layer's kept columns
    and bias refitted by least squares); statistics come from the dense model. A LLaMA-family
    model without biases gets them (``attention_bias``/``mlp_bias`` set in its config; the
    extra query/key/value or gate/up biases are zeros).

    ``sequential`` (with calibration data; the default): each attention layer and MLP, in model
    order, is scored and reconstructed on the outputs of the layers already pruned before it (one
    forward up to that layer per part, as :func:`secateurs.prune.oneshot` calibrates block by
    block), so the error of earlier layers is seen and compensated; ``False`` takes every
    statistic from the dense model in one pass.

    ``hidden`` (LLaMA and BERT families): the fraction of the residual-stream width removed, from
    every place that holds it at once (embeddings, every LayerNorm/RMSNorm, the inputs of
    query/key/value and gate/up/intermediate, the outputs of the attention and MLP output
    linears, LM head, pooler), scored by the L2 norm of every weight on that dim times (with
    calibration data) the RMS of the residual stream on it; ``config.hidden_size`` is patched. A
    norm then normalises over the kept dims only (not the same as zeroing the others). LLaMA
    rounds the kept width to a multiple of ``num_attention_heads`` (its config requires it).

    The model itself is not modified. The copy's config is patched (``num_attention_heads``,
    ``num_key_value_heads``, explicit ``head_dim``, ``intermediate_size``, ``hidden_size``), so
    its ``save_pretrained`` folder loads with stock ``from_pretrained`` to bit-identical outputs,
    except for BERT-family attention whose heads times head size is not the hidden size
    (:func:`check_pretrained`): a BERT model with heads removed loads only when ``hidden`` removes
    the same share of the width (``heads=0.25, hidden=0.25``: 12 heads of 32 on 384 become 9 on
    288).
    """
    fractions = _validate(sparsity, heads, neurons, reconstruct, gqa, round_to, hidden)
    check(isinstance(sequential, bool), "sequential", sequential, "True or False")
    crit = UNIT_CRITERIA.build(criterion) if isinstance(criterion, str) else criterion
    check(isinstance(crit, UnitCriterion), "criterion", criterion, f"a name in {list(UNIT_CRITERIA)} or a UnitCriterion")
    needs_data = crit.needs_data or crit.needs_grad or reconstruct is not None
    batches = None
    if needs_data:
        why = f"criterion {crit.name!r}" if crit.needs_data or crit.needs_grad else f"reconstruct={reconstruct!r}"
        check(calibration is not None, "calibration", None, f"an iterable of batches of model inputs: {why} reads data")
        assert calibration is not None
        batches = make_batches(calibration)
    training = {name: m.training for name, m in model.named_modules()}
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.grad = None
    _replace_mha(work)
    parts = [p for p in transformer_parts(work, gqa=gqa) if fractions[p.kind] > 0]
    _check_found(work, parts, fractions)
    if hidden:
        _check_hidden_family(work)
    record: dict[str, Any] = {"version": 1, "kind": "transformer", "criterion": crit.name,
                              "reconstruct": reconstruct, "sequential": bool(sequential and batches is not None),
                              "parts": {}}
    grads = (loss_fn or default_loss) if crit.needs_grad else None
    biased: set[str] = set()
    if reconstruct is not None:
        biased = _ensure_biases(work, parts)
    # Sequential: each part is calibrated on the outputs of the parts already pruned before it
    # (one forward up to its consumer per part); parallel: every part on the dense model.
    steps = [[p] for p in parts] if sequential and batches is not None else [parts]
    for group in steps:
        stats: dict[str, UnitStats] = {}
        if batches is not None:
            stop = group[-1].consumer if len(steps) > 1 else None
            stats = _collect(work, group, batches, gram=reconstruct == "lstsq", grads=grads, stop=stop)
            missing = [p.name for p in group if p.name + "/" + p.kind not in stats]
            check(not missing, "calibration", f"batches that never reach {missing[:3]}", "batches that run every layer")
        removals = []
        with torch.no_grad():
            for part in group:
                sc = crit(part, stats.get(part.name + "/" + part.kind))
                field_name = part.kind if (heads if part.kind == "heads" else neurons) is not None else "sparsity"
                removals.append(_select(part, sc.to(torch.float64), fractions[part.kind], round_to, field_name))
        for p in work.parameters():
            p.grad = None
        with torch.no_grad():
            for part, remove in zip(group, removals, strict=True):
                before = part.units
                full = part.consumer.weight.detach().clone()
                keep_cols = _cut(part, remove)
                if reconstruct is not None:
                    _reconstruct(part, full, keep_cols, stats[part.name + "/" + part.kind], reconstruct)
                record["parts"][f"{part.name}/{part.kind}"] = {"units": before, "kept": before - len(remove),
                                                               "removed": sorted(remove.tolist())}
    if hidden:
        record["hidden"] = _prune_hidden(work, hidden, batches, round_to)
    _patch_config(work, parts, biased)
    for name, m in work.named_modules():
        m.training = training.get(name, m.training)
    total = sum(v["units"] for v in record["parts"].values())
    record["sparsity"] = round(1 - sum(v["kept"] for v in record["parts"].values()) / total, 6) if total else 0.0
    setattr(work, RECORD_ATTR, record)
    return work


def _ensure_biases(model: nn.Module, parts: Sequence[Part]) -> set[str]:
    """Give every consumer a bias; for LLaMA-family configs, flip the config flag and give the
    sibling linears zero biases too, so the format still describes the model."""
    config = getattr(model, "config", None)
    flipped: set[str] = set()
    for part in parts:
        if part.consumer.bias is not None:
            continue
        if part.family == "llama":
            flag = "attention_bias" if part.kind == "heads" else "mlp_bias"
            check(config is not None and hasattr(config, flag), "reconstruct", "bias",
                  f"a layer with a bias, or a config with {flag!r} ({part.name!r} has none)")
            flipped.add("attention" if part.kind == "heads" else "mlp")
        _add_bias(part.consumer)
    if flipped:
        for part in transformer_parts(model):
            if ("attention" if part.kind == "heads" else "mlp") in flipped and part.family == "llama":
                for lin, _ in part.rows:
                    _add_bias(lin)
                _add_bias(part.consumer)
                if part.kind == "heads":
                    _add_bias(part.owner.k_proj)
                    _add_bias(part.owner.v_proj)
    return flipped


def _validate(sparsity: float | None, heads: float | None, neurons: float | None, reconstruct: str | None,
              gqa: str, round_to: int, hidden: float | None = None) -> dict[str, float]:
    check(sparsity is not None or heads is not None or neurons is not None or hidden is not None, "sparsity", None,
          "a fraction in (0, 1), or heads= / neurons= / hidden= fractions")
    fractions = {}
    for kind, value in (("heads", heads), ("neurons", neurons)):
        if value is not None:
            fractions[kind] = check_fraction(value, kind)
        elif sparsity is not None:
            fractions[kind] = check_fraction(sparsity, "sparsity", low_open=True)
        else:
            fractions[kind] = 0.0
    if hidden is not None:
        check_fraction(hidden, "hidden")
    check(any(fractions.values()) or bool(hidden), "heads/neurons", (heads, neurons),
          "at least one fraction above 0 (heads, neurons or hidden)")
    if reconstruct is not None:
        check_choice(reconstruct, "reconstruct", RECONSTRUCT)
    check_choice(gqa, "gqa", GQA_UNITS)
    check_int(round_to, "round_to", minimum=1)
    return fractions


def _check_found(model: nn.Module, parts: Sequence[Part], fractions: dict[str, float]) -> None:
    found = {p.kind for p in parts}
    for kind, fraction in fractions.items():
        if fraction > 0 and kind not in found:
            looked = ("LLaMA self_attn.{q,k,v,o}_proj, BERT attention.self.{query,key,value} + attention.output.dense, "
                      "or nn.TransformerEncoderLayer.self_attn") if kind == "heads" else (
                "LLaMA mlp.{gate,up,down}_proj, BERT intermediate.dense + output.dense, or "
                "nn.TransformerEncoderLayer.linear1/linear2")
            raise SecateursError(
                f"model: no {kind} to prune found in {type(model).__name__} (looked for {looked}); allowed: a "
                f"Transformer of those families, or {kind}=0 (use secateurs.prune.structured for other models)",
                field="model")
    counts = {(p.kind, p.units) for p in parts}
    if len({k for k, _ in counts}) != len(counts):
        sizes = sorted({f"{p.name}: {p.units} {p.kind}" for p in parts})
        raise SecateursError(f"model: layers differ in size ({', '.join(sizes[:4])}...); allowed: a model whose "
                             "layers have equal head and neuron counts (one count per model)", field="model")
