"""Group importance for structured pruning: one score per channel of a group of coupled layers.

Torch-Pruning's dependency graph hands us a *group*: every parameter slice that must go when one
channel goes (a convolution's filter, the BatchNorm entry after it, the next layer's input
column, the residual partners...). A criterion here is a callable over such a group (a
``torch_pruning.importance.Importance``, so Torch-Pruning's own pruners accept it too) that
returns one score per channel of the group's root layer; low scores are removed first.

Data-driven criteria see the scoring batches through three hooks that
:func:`secateurs.prune.structured` calls: ``start(model, groups)`` before the first
batch, ``observe(groups)`` after each batch (after ``backward`` when ``needs_loss``) and
``stop()`` at the end.

>>> import torch, torch_pruning as tp
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 4))
>>> group = dg.get_pruning_group(net[0], tp.prune_linear_out_channels, [0, 1, 2])
>>> GroupMagnitude()(group).shape
torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn

from secateurs.errors import SecateursError
from secateurs.prune.surgery.layers import RECURRENT_TYPES, recurrent_gates
from secateurs.registry import Registry

__all__ = [
    "GROUP_CRITERIA",
    "GroupActivation",
    "GroupBNScale",
    "GroupCriterion",
    "GroupGradient",
    "GroupMagnitude",
    "GroupRandom",
    "GroupTaylor",
    "GroupTaylorAbs",
    "channel_rows",
    "is_depthwise",
    "make_group_criterion",
    "register_group_criterion",
    "role",
    "root_channels",
]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def role(group: tp.Group, i: int) -> str:
    """``"out"``, ``"in"`` or ``"both"``: which side of its layer item ``i`` of ``group`` prunes."""
    dg = group._DG
    handler = group[i].dep.handler
    is_out, is_in = dg.is_out_channel_pruning_fn(handler), dg.is_in_channel_pruning_fn(handler)
    if is_out and is_in:
        return "both"
    return "out" if is_out else "in"


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one filter per input channel (in == out == groups)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _pick(p: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    if p is None:
        return None
    if grad:
        return p.grad if p.grad is not None else torch.zeros_like(p)
    return p.detach()


def _rows(t: torch.Tensor, dim: int, idxs: torch.Tensor) -> torch.Tensor:
    """Slices of ``t`` at ``idxs`` along ``dim``, one row per index: shape (len(idxs), -1).
    All of them in order (the usual case) is a view of ``t`` along dim 0, not a copy."""
    n = t.shape[dim]
    if len(idxs) == n and bool((idxs == torch.arange(n)).all()):
        return t.movedim(dim, 0).reshape(n, -1)
    return t.index_select(dim, idxs.to(t.device)).movedim(dim, 0).reshape(len(idxs), -1)


def channel_rows(
    module: nn.Module, idxs: torch.Tensor, side: str, *, grad: bool = False, bias: bool = False
) -> list[torch.Tensor]:
    """The parameter slices of ``module`` that channel ``idxs`` own, one row per channel.

    ``side`` is ``"out"`` (the channels the layer produces), ``"in"`` (the channels it consumes)
    or ``"both"`` (layers such as BatchNorm whose input and output channels are the same).
    ``grad=True`` returns the gradients instead of the values; ``bias`` adds biases and shifts.
    Layers that own nothing per channel (pooling, element-wise ops, bare parameters) give ``[]``.
    """
    out: list[torch.Tensor] = []

    def add(p: torch.Tensor | None, dim: int, ix: torch.Tensor = idxs) -> None:
        t = _pick(p, grad)
        if t is not None:
            out.append(_rows(t, dim, ix))

    producer = side in ("out", "both")
    if isinstance(module, nn.modules.conv._ConvNd):
        if is_depthwise(module):
            add(module.weight, 0)
            if bias:
                add(module.bias, 0)
        elif producer:
            if module.transposed and module.groups > 1:
                _add_grouped(out, _pick(module.weight, grad), module.groups, idxs)
            else:
                add(module.weight, 1 if module.transposed else 0)
            if bias:
                add(module.bias, 0)
        elif module.groups > 1 and not module.transposed:
            _add_grouped(out, _pick(module.weight, grad), module.groups, idxs)
        else:
            add(module.weight, 0 if module.transposed else 1)
    elif isinstance(module, nn.Linear):
        if producer:
            add(module.weight, 0)
            if bias:
                add(module.bias, 0)
        else:
            add(module.weight, 1)
    elif isinstance(module, _NORMS):
        add(getattr(module, "weight", None), -1 if isinstance(module, nn.LayerNorm) else 0)
        if bias:
            add(getattr(module, "bias", None), -1 if isinstance(module, nn.LayerNorm) else 0)
    elif isinstance(module, RECURRENT_TYPES):
        out += _recurrent_rows(module, idxs, producer, grad=grad, bias=bias)
    elif isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        three = torch.cat([idxs + k * e for k in range(3)])
        w = _pick(module.in_proj_weight, grad)
        if w is not None:
            out.append(_rows(w, 0, three).reshape(3, len(idxs), -1).transpose(0, 1).reshape(len(idxs), -1))
            out.append(_rows(w, 1, idxs))
        add(module.out_proj.weight, 0)
        add(module.out_proj.weight, 1)
        if bias and module.in_proj_bias is not None:
            b = _pick(module.in_proj_bias, grad)
            out.append(b[three.to(b.device)].reshape(3, len(idxs)).t())
    elif isinstance(module, nn.Embedding):
        add(module.weight, 1)
    return out


def _add_grouped(out: list[torch.Tensor], w: torch.Tensor | None, groups: int, idxs: torch.Tensor) -> None:
    """Rows of a grouped convolution's channels on the side its weight splits by group.

    A weight ``(groups * R, C, *k)`` holds, for channel ``g * C + c`` of that side, the slice
    ``w[g * R:(g + 1) * R, c]`` (a grouped convolution's input columns; a grouped transposed
    convolution's output columns)."""
    if w is None:
        return
    r, c = w.shape[0] // groups, w.shape[1]
    table = w.reshape(groups, r, c, -1).permute(0, 2, 1, 3).reshape(groups * c, -1)
    out.append(table.index_select(0, idxs.to(w.device)))


def _recurrent_rows(
    module: nn.RNNBase, idxs: torch.Tensor, producer: bool, *, grad: bool, bias: bool
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    n = len(idxs)
    if not producer:
        w = _pick(module.weight_ih_l0, grad)
        return [_rows(w, 1, idxs)]
    h = module.hidden_size
    gate_rows = torch.cat([idxs + g * h for g in range(recurrent_gates(module))])

    def gated(t: torch.Tensor) -> torch.Tensor:
        return _rows(t, 0, gate_rows).reshape(-1, n, t[0].numel()).transpose(0, 1).reshape(n, -1)

    for k in range(module.num_layers):
        out.append(gated(_pick(getattr(module, f"weight_ih_l{k}"), grad)))
        w_hh = _pick(getattr(module, f"weight_hh_l{k}"), grad)
        out.append(gated(w_hh))
        out.append(_rows(w_hh, 1, idxs))
        if k + 1 < module.num_layers:
            out.append(_rows(_pick(getattr(module, f"weight_ih_l{k + 1}"), grad), 1, idxs))
        if bias and module.bias:
            for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                b = _pick(getattr(module, name), grad)
                out.append(b[gate_rows.to(b.device)].reshape(-1, n).t())
    return out


def _items(group: tp.Group) -> Iterable[tuple[int, nn.Module, torch.Tensor, torch.Tensor]]:
    """(position, layer, channel idxs in the layer, the root channels they map to) per item."""
    for i, item in enumerate(group):
        module = item.dep.target.module
        root = item.root_idxs
        if isinstance(module, nn.Parameter) or not isinstance(module, nn.Module) or not item.idxs:
            continue
        if any(r is None for r in root):
            continue
        yield i, module, torch.as_tensor(item.idxs, dtype=torch.long), torch.as_tensor(root, dtype=torch.long)


def root_channels(group: tp.Group) -> int:
    """Number of channels of the group's root layer (the length of every score vector)."""
    return len(group[0].idxs)


def _scatter(
    group: tp.Group, per_item: Callable[[int, nn.Module, torch.Tensor], torch.Tensor | None]
) -> torch.Tensor | None:
    """Sum per-item channel scores into root-channel space; None if no item scored."""
    total = torch.zeros(root_channels(group), dtype=torch.float64)
    scored = False
    for i, module, idxs, root in _items(group):
        s = per_item(i, module, idxs)
        if s is None:
            continue
        total.index_add_(0, root, s.detach().to("cpu", torch.float64))
        scored = True
    return total if scored else None


GROUP_CRITERIA: Registry[GroupCriterion] = Registry("group criterion", field="criterion")
"""Structured (group) criteria by name; ``GROUP_CRITERIA.register("name")`` adds one."""

register_group_criterion = GROUP_CRITERIA.register
"""Class decorator: ``@register_group_criterion("name")`` makes a GroupCriterion available by name."""


class GroupCriterion(tp.importance.Importance):
    """Base of the structured criteria: ``criterion(group)`` gives one score per root channel.

    Subclasses are registered with ``@register_group_criterion("name")`` (which sets ``name``);
    criteria that read data set ``needs_data`` (and ``needs_loss`` when
    they read gradients) and override :meth:`start`, :meth:`observe` and :meth:`stop`.
    ``__call__`` returns ``None`` for a group it cannot score; such groups are left intact.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False

    def start(self, model: nn.Module, groups: Sequence[tp.Group]) -> None:
        """Called once before the scoring batches."""

    def observe(self, groups: Sequence[tp.Group]) -> None:
        """Called after each scoring batch (after its backward pass when ``needs_loss``)."""

    def stop(self) -> None:
        """Called after the last batch: remove hooks, keep the statistics."""

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        raise NotImplementedError


@register_group_criterion("magnitude")
class GroupMagnitude(GroupCriterion):
    """Sum over the group of ``|w|^p`` of every weight a channel owns (``p=2`` by default).

    The group L2 norm squared of Torch-Pruning's ``MagnitudeImportance``: filters, input
    columns, norm scales and recurrent gate rows of all coupled layers together.
    """

    def __init__(self, p: float = 2.0):
        self.p = p

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        def score(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            rows = channel_rows(module, idxs, role(group, i))
            if not rows:
                return None
            if self.p == 2:  # one pass, no |w| temporary
                return sum(torch.linalg.vecdot(r, r) for r in rows)
            return sum(r.abs().pow(self.p).sum(1) for r in rows)

        return _scatter(group, score)


@register_group_criterion("bn_scale")
class GroupBNScale(GroupCriterion):
    """``|gamma|`` of the normalisation layers (BatchNorm, GroupNorm, LayerNorm) in the group.

    Network slimming (Liu et al. 2017). Groups without an affine normalisation layer cannot be
    scored and are left intact.
    """

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        def score(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            if not isinstance(module, _NORMS) or getattr(module, "weight", None) is None:
                return None
            return channel_rows(module, idxs, role(group, i))[0].abs().sum(1)

        return _scatter(group, score)


@register_group_criterion("random")
class GroupRandom(GroupCriterion):
    """Uniform random scores from a seeded generator: the baseline every criterion must beat."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(root_channels(group), generator=self.generator, dtype=torch.float64)


class _BatchAverage(GroupCriterion):
    """Accumulates a per-channel statistic per group over the scoring batches."""

    needs_data = True
    needs_loss = True

    def __init__(self) -> None:
        self._sums: dict[Any, torch.Tensor] = {}
        self._counts: dict[Any, int] = {}

    def _batch_score(self, group: tp.Group) -> torch.Tensor | None:
        raise NotImplementedError

    def start(self, model: nn.Module, groups: Sequence[tp.Group]) -> None:
        self._sums.clear()
        self._counts.clear()

    @torch.no_grad()
    def observe(self, groups: Sequence[tp.Group]) -> None:
        for group in groups:
            s = self._batch_score(group)
            if s is None:
                continue
            key = group[0].dep.target.module
            self._sums[key] = self._sums.get(key, 0) + s
            self._counts[key] = self._counts.get(key, 0) + 1

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        key = group[0].dep.target.module
        if key not in self._sums:
            return None
        return self._sums[key] / self._counts[key]


@register_group_criterion("gradient")
class GroupGradient(_BatchAverage):
    """``sum |dL/dw|`` over the weights a channel owns, averaged over the scoring batches.

    The seeds' gradient-magnitude criterion lifted from weights to channels.
    """

    def _batch_score(self, group: tp.Group) -> torch.Tensor | None:
        def score(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            rows = channel_rows(module, idxs, role(group, i), grad=True)
            return sum(r.abs().sum(1) for r in rows) if rows else None

        return _scatter(group, score)


@register_group_criterion("taylor")
class GroupTaylor(GroupCriterion):
    """``sum |w * mean_b dL_b/dw|`` over the weights a channel owns.

    The mask criterion ``taylor`` (first-order Taylor saliency of each weight from the gradient
    averaged over the scoring batches; SNIP when scored at initialisation) summed over the
    channel's coupled weights. Over several batches this is Torch-Pruning's ``TaylorImportance``
    with the gradients accumulated in ``.grad``.
    """

    needs_data = True
    needs_loss = True

    def __init__(self) -> None:
        self._grads: dict[Any, list[torch.Tensor]] = {}
        self._counts: dict[Any, int] = {}

    def start(self, model: nn.Module, groups: Sequence[tp.Group]) -> None:
        self._grads.clear()
        self._counts.clear()

    @torch.no_grad()
    def observe(self, groups: Sequence[tp.Group]) -> None:
        for group in groups:
            rows = [r.to(torch.float64) for i, module, idxs, _ in _items(group)
                    for r in channel_rows(module, idxs, role(group, i), grad=True)]
            key = group[0].dep.target.module
            if key in self._grads:
                for total, r in zip(self._grads[key], rows, strict=True):
                    total.add_(r)
            else:
                self._grads[key] = rows
            self._counts[key] = self._counts.get(key, 0) + 1

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        key = group[0].dep.target.module
        if key not in self._grads:
            return None
        grads = iter(self._grads[key])
        count = self._counts[key]

        def score(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            w = channel_rows(module, idxs, role(group, i))
            return sum((a.to(torch.float64) * next(grads) / count).abs().sum(1) for a in w) if w else None

        return _scatter(group, score)


@register_group_criterion("taylor_abs")
class GroupTaylorAbs(_BatchAverage):
    """``mean_b sum |w * dL_b/dw|`` over the weights a channel owns.

    Like ``taylor`` but the magnitude is taken per batch, so gradients of opposite sign in
    different batches add up instead of cancelling. Squaring the signed group sum instead
    (Molchanov et al. 2019) scored worse in ``bench/structured.py``.
    """

    def _batch_score(self, group: tp.Group) -> torch.Tensor | None:
        def score(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            side = role(group, i)
            w = channel_rows(module, idxs, side)
            g = channel_rows(module, idxs, side, grad=True)
            return sum((a * b).abs().sum(1) for a, b in zip(w, g, strict=True)) if w else None

        return _scatter(group, score)


def _channel_mean_abs(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    dim = 1 if isinstance(module, _CHANNEL_FIRST) and x.dim() > 1 else x.dim() - 1
    return x.detach().abs().movedim(dim, -1).reshape(-1, x.shape[dim]).to(torch.float64).mean(0).cpu()


@register_group_criterion("activation")
class GroupActivation(GroupCriterion):
    """``sum |activation x weight|``: mean ``|input|`` of a channel times the weights reading it.

    For every layer in the group that consumes the channel: ``E|x_c| * sum |W[:, c]|`` (the seeds'
    activation criterion lifted to channels). A group with no consuming layer falls back to the
    mean ``|output|`` of the channel at its producers. Needs batches, not a loss.
    """

    needs_data = True

    def __init__(self) -> None:
        self._inputs: dict[nn.Module, list] = {}
        self._outputs: dict[nn.Module, list] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def start(self, model: nn.Module, groups: Sequence[tp.Group]) -> None:
        self.stop()
        self._inputs.clear()
        self._outputs.clear()
        modules = {item.dep.target.module for g in groups for item in g}
        for m in modules:
            if isinstance(m, nn.Module) and not isinstance(m, nn.Parameter):
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            _accumulate(self._inputs, module, _channel_mean_abs(x, module))
        y = output[0] if isinstance(output, tuple) else output
        if isinstance(y, torch.Tensor) and y.dim() > 0:
            _accumulate(self._outputs, module, _channel_mean_abs(y, module))

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        def consumer(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            side = role(group, i)
            reads = side == "in" or (side == "both" and (is_depthwise(module) or isinstance(module, nn.MultiheadAttention)))
            stats = self._inputs.get(module)
            if not reads or stats is None or stats[0].numel() <= int(idxs.max()):
                return None
            rows = channel_rows(module, idxs, "in" if side == "in" else side)
            if isinstance(module, nn.MultiheadAttention):
                rows = rows[1:2]  # the input columns of the q/k/v projection
            weight = sum(r.abs().sum(1) for r in rows)
            return (stats[0] / stats[1])[idxs] * weight.to(torch.float64).cpu()

        def producer(i: int, module: nn.Module, idxs: torch.Tensor) -> torch.Tensor | None:
            stats = self._outputs.get(module)
            if role(group, i) == "in" or stats is None or stats[0].numel() <= int(idxs.max()):
                return None
            return (stats[0] / stats[1])[idxs]

        scores = _scatter(group, consumer)
        return scores if scores is not None else _scatter(group, producer)


def _accumulate(store: dict[nn.Module, list], module: nn.Module, value: torch.Tensor) -> None:
    if module in store and store[module][0].shape == value.shape:
        store[module][0] += value
        store[module][1] += 1
    else:
        store[module] = [value, 1]


def make_group_criterion(criterion: str | GroupCriterion, **options: Any) -> GroupCriterion:
    """A criterion instance from its registered name (with constructor ``options``) or the instance itself."""
    if isinstance(criterion, GroupCriterion):
        return criterion
    if isinstance(criterion, str) and criterion in GROUP_CRITERIA:
        return GROUP_CRITERIA.build(criterion, **options)
    raise SecateursError(
        f"criterion: got {criterion!r}; allowed: {', '.join(GROUP_CRITERIA)} or a GroupCriterion", field="criterion"
    )
