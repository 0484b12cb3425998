"""Structured pruning: remove whole channels, neurons, hidden units and attention heads.

Masks leave a model as large and as slow as before; this module makes it physically smaller.
:func:`structured` asks Torch-Pruning's dependency graph which parameter slices are coupled (a
filter, its BatchNorm entry, the next layer's input column, every partner across a residual
add, a depthwise convolution's channel, an LSTM's gate rows, an attention head), scores each
coupled channel with a criterion from :mod:`secateurs.prune.structured_criteria`, chooses what to
remove (per layer or globally) and cuts it out of every coupled layer at once.

The classifier's outputs and the model's input channels never change: any group whose channels
reach the model output is left intact, and the input is not a layer. After surgery the model is
run once on ``example_inputs``; if a coupling escaped the graph, the call fails with an error
naming the layer, and the caller's model is untouched (surgery happens on a copy).

Ratios are cumulative: the model returned carries a record of its original size
(:func:`pruning_record`), and ``ratio=0.5`` always means "half of the *original* channels gone",
so the iterative loop ``prune 0.25 -> fine-tune -> prune 0.5`` ends at half the channels, not at
``1 - 0.75 * 0.5``. ``target_macs`` is relative to the original MACs in the same way.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> small = structured(net, torch.zeros(1, 8), ratio=0.5)
>>> small[0].out_features, small[2].out_features, net[0].out_features
(16, 4, 32)
"""

from __future__ import annotations

import copy
import math
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from secateurs.errors import SecateursError, check
from secateurs.measure import count_macs, count_params, forward
from secateurs.prune.structured_criteria import (
    GroupCriterion,
    is_depthwise,
    make_group_criterion,
    role,
    root_channels,
)
from secateurs.prune.structured_layers import RECURRENT_TYPES, customized_pruners

__all__ = ["RECORD_ATTR", "ChannelGroup", "channel_groups", "pruning_record", "structured"]

#: Attribute of a pruned model holding its :func:`pruning_record` (a JSON-able dict).
RECORD_ATTR = "_secateurs_structured"
RECORD_VERSION = 1

ROOT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, *RECURRENT_TYPES, nn.MultiheadAttention, nn.Embedding,
)
SCOPES = ("layer", "global")

Inputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs
Ignore = Iterable[str | nn.Module | type[nn.Module]]


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]


def _produces(module: Any) -> bool:
    """Layers whose output channels are their own (not a copy of their input's)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return not is_depthwise(module)
    return isinstance(module, (nn.Linear, nn.Embedding, *RECURRENT_TYPES))


@dataclass
class ChannelGroup:
    """One set of coupled channels that is pruned as a unit.

    ``key`` is the root layer's name (stable across calls on the same architecture); ``layers``
    names every layer and bare parameter that loses slices with it. Channels are removed in
    units of ``unit_size`` channels: 1, or ``head_dim`` when the group runs through an
    ``nn.MultiheadAttention`` (a unit is then a head). ``unit_of[c]`` is the unit of root
    channel ``c``.
    """

    key: str
    layers: tuple[str, ...]
    group: tp.Group
    unit_of: torch.Tensor
    units: int
    unit_size: int

    @property
    def unit_kind(self) -> str:
        """``"head"`` for attention groups, ``"channel"`` otherwise."""
        return "head" if self.unit_size > 1 else "channel"


class _Graph:
    """Torch-Pruning's dependency graph of one model and the groups we may prune in it."""

    def __init__(self, model: nn.Module, example_inputs: Inputs, ignored: set[str]):
        self.model = model
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        # Torch-Pruning warns about every op it guesses at; we keep them for error messages.
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            self.dg = self._build(example_inputs)
            self.unknown_ops = sorted({str(w.message).split("operation ")[-1].split(" encountered")[0]
                                       for w in caught if "Unknown operation" in str(w.message)})
            self._collect(ignored)

    def _build(self, example_inputs: Inputs) -> tp.DependencyGraph:
        try:
            return tp.DependencyGraph().build_dependency(
                self.model,
                example_inputs=example_inputs,
                forward_fn=forward,
                customized_pruners=customized_pruners(),
            )
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1].name
            raise SecateursError(
                f"model: Torch-Pruning's dependency graph cannot trace it ({type(exc).__name__} "
                f"in {where}: {exc}); structured pruning needs a model the graph can handle"
            ) from None

    def _collect(self, ignored: set[str]) -> None:
        protected_nodes, protected_producers = self._output_side()
        for group in self.dg.get_all_groups(root_module_types=ROOT_TYPES):
            key = self._name(group[0].dep.target.module)
            layers = tuple(dict.fromkeys(self._name(item.dep.target.module) for item in group
                                         if self._name(item.dep.target.module)))
            hit = sorted(set(layers) & ignored)
            if hit:
                self.skipped[key] = f"touches ignored {', '.join(hit)}"
                continue
            if any(item.dep.target in protected_nodes
                   or (item.dep.target in protected_producers and role(group, i) != "in")
                   for i, item in enumerate(group)):
                self.skipped[key] = "feeds the model output"
                continue
            self._check_supported(group)
            self._check_indices(key, group)
            self.groups.append(self._channel_group(key, layers, group))

    def _name(self, module: Any) -> str:
        if isinstance(module, nn.Parameter):
            return self.dg._param_to_name.get(module, "")
        return self.dg._module2name.get(module, "") if isinstance(module, nn.Module) else ""

    def _output_side(self) -> tuple[set, set]:
        """Nodes whose channels are the model's output channels.

        Walk back from every sink of the graph through shape-preserving ops (element-wise,
        reshapes, norms, attention) to the first layers that produce channels of their own.
        """
        nodes, producers = set(), set()
        stack = [n for n in self.dg.module2node.values() if not n.outputs]
        while stack:
            node = stack.pop()
            if node in nodes or node in producers:
                continue
            if _produces(node.module):
                producers.add(node)
                continue
            nodes.add(node)
            stack.extend(node.inputs)
        return nodes, producers

    def _check_supported(self, group: tp.Group) -> None:
        for item in group:
            m, name = item.dep.target.module, self._name(item.dep.target.module)
            hint = f"pass ignore=[{name!r}] to keep it and the channels it touches intact"
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m):
                raise SecateursError(
                    f"layer {name!r}: grouped convolution (groups={m.groups}) is not supported by "
                    f"structured pruning (allowed: groups=1 or depthwise); {hint}"
                )
            if isinstance(m, nn.MultiheadAttention) and not m._qkv_same_embed_dim:
                raise SecateursError(
                    f"layer {name!r}: MultiheadAttention with kdim/vdim != embed_dim is not "
                    f"supported by structured pruning; {hint}"
                )

    def suspects(self, groups: Iterable[tp.Group]) -> str:
        """The layers and ops in ``groups`` that the graph only guessed at, for error messages."""
        owners = {}
        for group in groups:
            for item in group:
                if isinstance(item.dep.target.module, nn.Parameter):
                    owner = self._name(item.dep.target.module).rpartition(".")[0]
                    module = dict(self.model.named_modules()).get(owner)
                    if owner and module is not None:
                        owners[owner] = type(module).__name__
        parts = [f"layer {n!r} ({t}) uses its parameters outside any layer the graph knows" for n, t in owners.items()]
        if self.unknown_ops:
            parts.append(f"ops treated as element-wise: {', '.join(self.unknown_ops)}")
        return "; ".join(parts) if parts else "an op between them is not understood by Torch-Pruning's dependency graph"

    def _check_indices(self, key: str, group: tp.Group) -> None:
        """Channels the graph maps past a layer's width mean it misread an op between them."""
        for i, item in enumerate(group):
            m = item.dep.target.module
            if isinstance(m, nn.Parameter) or not isinstance(m, (*ROOT_TYPES, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                continue
            side = role(group, i)
            width = self.dg.get_in_channels(m) if side == "in" else self.dg.get_out_channels(m)
            if width is not None and item.idxs and max(item.idxs) >= width:
                name = self._name(m)
                raise SecateursError(
                    f"layer {name!r} ({type(m).__name__}): the dependency graph maps "
                    f"{root_channels(group)} channels of {key!r} onto its {width} "
                    f"{'input' if side == 'in' else 'output'} channels; {self.suspects([group])}; "
                    f"pass ignore=[{key!r}] to keep these channels intact"
                )

    def _channel_group(self, key: str, layers: tuple[str, ...], group: tp.Group) -> ChannelGroup:
        n = root_channels(group)
        attention = [(item, item.dep.target.module) for item in group
                     if isinstance(item.dep.target.module, nn.MultiheadAttention)]
        if not attention:
            return ChannelGroup(key, layers, group, torch.arange(n), n, 1)
        unit_of = torch.full((n,), -1, dtype=torch.long)
        head_dims = {m.head_dim for _, m in attention}
        names = ", ".join(repr(self._name(m)) for _, m in attention)
        ok = len(head_dims) == 1
        for item, m in attention:
            heads = torch.as_tensor(item.idxs, dtype=torch.long) // m.head_dim
            root = torch.as_tensor(item.root_idxs, dtype=torch.long)
            ok = ok and bool(((unit_of[root] == -1) | (unit_of[root] == heads)).all())
            unit_of[root] = heads
        head_dim = head_dims.pop()
        ok = ok and bool((unit_of >= 0).all()) and bool((torch.bincount(unit_of) == head_dim).all())
        if not ok:
            raise SecateursError(
                f"layers {names}: attention layers share channels but not head boundaries, so "
                f"whole heads cannot be removed; pass ignore=[{names}] to keep them intact"
            )
        return ChannelGroup(key, layers, group, unit_of, n // head_dim, head_dim)

    def prune(self, removal: dict[str, torch.Tensor]) -> None:
        """Cut ``removal[key]`` (unit ids) out of every group, in place."""
        by_key = {g.key: g for g in self.groups}
        for key, units in removal.items():
            if len(units) == 0:
                continue
            cg = by_key[key]
            idxs = torch.nonzero(torch.isin(cg.unit_of, units)).flatten().tolist()
            root = cg.group[0]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.dg.get_pruning_group(root.dep.target.module, root.dep.handler, idxs).prune()
            except Exception as exc:
                raise SecateursError(
                    f"layer {key!r}: removing {len(idxs)} channels coupled with "
                    f"{', '.join(cg.layers)} failed ({type(exc).__name__}: {exc}); pass "
                    f"ignore=[{key!r}] to keep them intact"
                ) from None


def _resolve_ignore(model: nn.Module, ignore: Ignore | str) -> set[str]:
    """Names of the layers and parameters ``ignore`` covers (submodules included)."""
    if isinstance(ignore, (str, nn.Module, type)):
        ignore = [ignore]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    by_id = {id(m): n for n, m in modules.items()}
    out: set[str] = set()

    def cover(prefix: str) -> None:
        out.add(prefix)
        dotted = prefix + "." if prefix else ""
        out.update(n for n in list(modules) + list(params) if n.startswith(dotted))

    for item in ignore:
        if isinstance(item, str):
            if item in modules or item in params:
                cover(item)
                continue
            sample = ", ".join(repr(n) for n in list(modules)[1:6])
            raise SecateursError(f"ignore: got {item!r}; no layer or parameter has that name; allowed: names from model.named_modules(), e.g. {sample}")
        if isinstance(item, nn.Module):
            check(id(item) in by_id, "ignore", type(item).__name__, "layers of the model being pruned")
            cover(by_id[id(item)])
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            names = [n for n, m in modules.items() if isinstance(m, item)]
            check(bool(names), "ignore", item.__name__, "a layer type present in the model")
            for n in names:
                cover(n)
            continue
        raise SecateursError(f"ignore: got {item!r}; allowed: layer names, layers or layer types")
    return out


def _unit_scores(cg: ChannelGroup, channel_scores: torch.Tensor | None) -> torch.Tensor | None:
    """Mean channel score per unit, or None if the criterion could not score the group."""
    if channel_scores is None:
        return None
    s = channel_scores.to(torch.float64).flatten()
    sums = torch.zeros(cg.units, dtype=torch.float64).index_add_(0, cg.unit_of, s)
    return sums / cg.unit_size


def _score(
    graph: _Graph,
    criterion: GroupCriterion,
    batches: Sequence[Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    model = graph.model
    groups = [cg.group for cg in graph.groups]
    if criterion.needs_data:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        criterion.start(model, groups)
        seen = 0
        try:
            for batch in batches or ():
                inputs, targets = batch[0], batch[1]
                inputs = _to(inputs, device)
                if criterion.needs_loss:
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss_fn(forward(model, inputs), _to(targets, device)).backward()
                else:
                    with torch.no_grad():
                        forward(model, inputs)
                criterion.observe(groups)
                seen += 1
        finally:
            criterion.stop()
            model.zero_grad(set_to_none=True)
        check(seen > 0, "batches", "an empty iterable", f"at least one (inputs, targets) batch for criterion {criterion.name!r}")
    scores = {}
    for cg in graph.groups:
        s = _unit_scores(cg, criterion(cg.group))
        if s is not None:
            scores[cg.key] = s
    return scores


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@dataclass(frozen=True)
class _Selector:
    """Chooses which units to remove for a cumulative ratio, given fixed scores."""

    groups: Sequence[ChannelGroup]
    scores: dict[str, torch.Tensor]
    original: dict[str, int]
    scope: str
    max_layer_ratio: float
    round_to: int

    def floor(self, cg: ChannelGroup) -> int:
        return max(1, math.ceil(self.original[cg.key] * (1.0 - self.max_layer_ratio) - 1e-9))

    def __call__(self, ratio: float) -> dict[str, torch.Tensor]:
        scored = [cg for cg in self.groups if cg.key in self.scores]
        if self.scope == "layer":
            keep = {cg.key: max(self.floor(cg), int(self.original[cg.key] * (1.0 - ratio) + 0.5)) for cg in scored}
            removal = {cg.key: torch.argsort(self.scores[cg.key], stable=True)[: max(0, cg.units - keep[cg.key])]
                       for cg in scored}
        else:
            removal = self._global(scored, ratio)
        return {k: self._round(k, v) for k, v in removal.items() if len(v)}

    def _global(self, scored: list[ChannelGroup], ratio: float) -> dict[str, torch.Tensor]:
        original = sum(self.original[cg.key] * cg.unit_size for cg in scored)
        current = sum(cg.units * cg.unit_size for cg in scored)
        budget = current - int(original * (1.0 - ratio) + 0.5)
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


def pruning_record(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`structured` recorded on ``model``: original MACs/params and, per group, the
    original and kept units (``{"version", "macs", "params", "groups": {key: {...}}}``), or None
    for a model that was never structurally pruned. It travels with ``copy.deepcopy`` and with
    :func:`secateurs.prune.structured_io.save_structured`."""
    record = getattr(model, RECORD_ATTR, None)
    return copy.deepcopy(record) if record is not None else None


def channel_groups(model: nn.Module, example_inputs: Inputs, *, ignore: Ignore = ()) -> list[ChannelGroup]:
    """The groups of coupled channels :func:`structured` would prune in ``model`` (a dry run)."""
    work = copy.deepcopy(model)
    return _Graph(work, example_inputs, _resolve_ignore(work, ignore)).groups


def structured(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    criterion: str | GroupCriterion = "magnitude",
    scope: str = "layer",
    ignore: Ignore = (),
    rounds: int = 1,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    max_layer_ratio: float = 0.9,
    round_to: int = 1,
) -> nn.Module:
    """Return a physically smaller copy of ``model`` with whole channels/neurons/heads removed.

    ``model`` itself is not modified (the result is a pruned deep copy; build a new optimizer for
    it). Exactly one of:

    - ``ratio`` in (0, 1): the fraction of channels removed, relative to the original model.
      ``scope="layer"``: from every prunable group (as Torch-Pruning's ``pruning_ratio``);
      ``scope="global"``: across all groups together, ranked by scale-free importance
      (each group's scores divided by their mean). In both scopes no group loses more than
      ``max_layer_ratio`` of its original channels, and every group keeps at least one.
    - ``target_macs`` in (0, 1): prune (with the chosen scope) until at most that fraction of
      the original MACs (as :func:`secateurs.measure.count_macs` counts them) remains, found
      by bisection on the ratio; whole heads are coarse, so attention models may land below.

    Both are cumulative across calls: a model returned by this function remembers its original
    size (:func:`pruning_record`), so ``structured(structured(m, x, ratio=0.25), x, ratio=0.5)``
    has half of ``m``'s channels, exactly like ``structured(m, x, ratio=0.5)``. A target already
    met removes nothing.

    ``criterion`` is a name from :data:`GROUP_CRITERIA` (``magnitude``, ``taylor``,
    ``gradient``, ``activation``, ``bn_scale``, ``random``) or a
    :class:`~secateurs.prune.structured_criteria.GroupCriterion`. ``taylor`` and ``gradient``
    need ``batches`` (an iterable of ``(inputs, targets)``) and use ``loss_fn`` (default
    cross-entropy); ``activation`` needs ``batches`` only. ``rounds`` > 1 prunes in that many
    steps within this call (ratio ``ratio*k/rounds``, or MACs geometrically towards the
    target), rescoring after each; ``batches`` must then be re-iterable (a list or DataLoader).

    ``ignore`` names layers (or passes layers or layer types) that must keep their exact shape;
    every group that would change them is left intact. Groups feeding the model output (the
    classifier) are always left intact. ``round_to`` keeps channel counts multiples of it.

    Attention (``nn.MultiheadAttention``) is pruned by whole heads; since the module ties
    ``embed_dim`` to ``num_heads * head_dim``, removing a head removes ``head_dim`` channels of
    everything coupled with its embedding (the residual stream of a Transformer block).
    Recurrent layers lose hidden units (the same units in every stacked layer).
    """
    _validate(ratio, target_macs, scope, rounds, max_layer_ratio, round_to)
    crit = make_group_criterion(criterion)
    if crit.needs_data:
        check(batches is not None, "batches", None, f"an iterable of (inputs, targets) batches: criterion {crit.name!r} reads data")
        if batches is not None and iter(batches) is batches:
            batches = list(batches)  # scored once per round and per bisection: must be re-iterable
    loss = loss_fn or F.cross_entropy
    training = {name: m.training for name, m in model.named_modules()}
    ignored = _resolve_ignore(model, ignore)
    work = copy.deepcopy(model)
    _refuse_untraceable(work)
    try:
        with torch.no_grad():
            expected = _shapes(forward(work.eval(), example_inputs))
    except Exception as exc:
        raise SecateursError(
            f"example_inputs: the model fails on them ({type(exc).__name__}: {exc}); allowed: "
            "inputs the model accepts, as a tensor, a tuple (positional) or a dict (keywords)"
        ) from None
    record = pruning_record(model) or {"version": RECORD_VERSION, "groups": {}}
    if "macs" not in record:
        record["macs"] = count_macs(work, example_inputs)
        record["params"] = count_params(work)
    start_macs = count_macs(work, example_inputs) if target_macs is not None else 0
    try:
        for k in range(1, rounds + 1):
            graph = _Graph(work, example_inputs, ignored)
            _check_prunable(graph, ignore)
            for cg in graph.groups:
                record["groups"].setdefault(cg.key, {"units": cg.units, "unit": cg.unit_kind, "layers": list(cg.layers)})
            scores = _score(graph, crit, batches, loss)
            check(bool(scores), "criterion", crit.name, "a criterion that scores at least one group (bn_scale needs BatchNorm/LayerNorm layers)")
            select = _Selector(graph.groups, scores, {key: g["units"] for key, g in record["groups"].items()},
                               scope, max_layer_ratio, round_to)
            if ratio is not None:
                removal = select(ratio * k / rounds)
            else:
                goal = start_macs * (target_macs * record["macs"] / start_macs) ** (k / rounds)
                removal = _bisect_macs(work, example_inputs, ignored, select, goal, target_macs, record["macs"])
            graph.prune(removal)
            _verify(work, example_inputs, expected, graph)
            for cg in graph.groups:
                record["groups"][cg.key]["kept"] = cg.units - len(removal.get(cg.key, ()))
    finally:
        for name, m in work.named_modules():
            m.training = training.get(name, m.training)
    setattr(work, RECORD_ATTR, record)
    return work


def _refuse_untraceable(model: nn.Module) -> None:
    """Layers whose internals Torch-Pruning's graph misreads (it traces into them)."""
    for name, m in model.named_modules():
        if isinstance(m, RECURRENT_TYPES) and (m.bidirectional or m.proj_size):
            raise SecateursError(
                f"layer {name!r}: {type(m).__name__}(bidirectional={m.bidirectional}, "
                f"proj_size={m.proj_size}) is not supported by structured pruning; allowed: "
                "unidirectional RNN/LSTM/GRU without proj_size"
            )


def _validate(ratio: float | None, target_macs: float | None, scope: str, rounds: int, max_layer_ratio: float, round_to: int) -> None:
    check((ratio is None) != (target_macs is None), "ratio/target_macs", (ratio, target_macs), "exactly one of them")
    if ratio is not None:
        check(isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0, "ratio", ratio, "a fraction in (0, 1)")
    if target_macs is not None:
        check(isinstance(target_macs, (int, float)) and 0.0 < target_macs < 1.0, "target_macs", target_macs, "a fraction of the original MACs in (0, 1)")
    check(scope in SCOPES, "scope", scope, " or ".join(map(repr, SCOPES)))
    check(isinstance(rounds, int) and rounds >= 1, "rounds", rounds, "an integer >= 1")
    check(isinstance(max_layer_ratio, (int, float)) and 0.0 < max_layer_ratio <= 1.0, "max_layer_ratio", max_layer_ratio, "a fraction in (0, 1]")
    check(isinstance(round_to, int) and round_to >= 1, "round_to", round_to, "an integer >= 1")


def _check_prunable(graph: _Graph, ignore: Any) -> None:
    if graph.groups:
        return
    why = "; ".join(f"{k}: {v}" for k, v in graph.skipped.items()) or "no Conv/Linear/RNN/attention layer found"
    raise SecateursError(
        f"ignore: got {list(ignore) if not isinstance(ignore, str) else ignore!r}; nothing is left to prune ({why}); "
        "allowed: a model with at least one prunable layer that does not feed the output directly"
    )


def _bisect_macs(
    work: nn.Module,
    example_inputs: Inputs,
    ignored: set[str],
    select: _Selector,
    goal: float,
    target: float,
    original_macs: int,
) -> dict[str, torch.Tensor]:
    """The smallest cumulative ratio whose pruning leaves at most ``goal`` MACs."""
    cache: dict[tuple, int] = {}

    def macs(removal: dict[str, torch.Tensor]) -> int:
        sig = tuple(sorted((k, tuple(v.tolist())) for k, v in removal.items()))
        if sig not in cache:
            trial = copy.deepcopy(work)
            _Graph(trial, example_inputs, ignored).prune(removal)
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
            f"max_layer_ratio={select.max_layer_ratio} and these ignored layers; allowed: "
            f"target_macs >= {reachable:.4f}, or raise max_layer_ratio"
        )
    # Below this step in the ratio no unit changes hands: one unit of the largest scope.
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


def _verify(model: nn.Module, example_inputs: Inputs, expected: list[tuple[int, ...]], graph: _Graph) -> None:
    """Run the pruned model once; name the layer where a missed coupling shows up."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names[module])

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    suspects = graph.suspects(cg.group for cg in graph.groups)
    try:
        with torch.no_grad():
            got = _shapes(forward(model.eval(), example_inputs))
    except Exception as exc:
        where = stack[-1] if stack else "<model>"
        layer = f"{where!r} ({type(dict(model.named_modules())[where]).__name__})" if stack else where
        raise SecateursError(
            f"layer {layer}: the pruned model fails here ({type(exc).__name__}: {exc}); "
            f"Torch-Pruning's dependency graph misread the channels reaching it ({suspects}); "
            f"pass ignore=[{where!r}] (or the layers feeding it) to keep them intact"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    if got != expected:
        raise SecateursError(
            f"model output: shapes changed from {expected} to {got} after pruning; an op the "
            f"graph cannot handle couples the output to a pruned layer ({suspects}); pass those layers in ignore"
        )

