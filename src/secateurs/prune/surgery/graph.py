"""The dependency graph of one model, cut into the groups of channels pruned as a unit.

Torch-Pruning's dependency graph says which parameter slices are coupled (a filter, its
BatchNorm entry, the next layer's input column, every partner across a residual add, a
depthwise convolution's channel, an LSTM's gate rows, an attention head). :class:`Graph` builds
it, leaves out the groups that touch excluded layers or feed the model output, and checks the
rest before anything is cut; :class:`ChannelGroup` is one such group.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from secateurs.errors import SecateursError, check
from secateurs.inputs import forward, tensors_of
from secateurs.measure import MacCounter
from secateurs.prune.surgery.criteria import is_depthwise, role, root_channels
from secateurs.prune.surgery.layers import RECURRENT_TYPES, customized_pruners

__all__ = ["ROOT_TYPES", "ChannelGroup", "Exclude", "Graph", "Inputs", "fused_heads", "output_shapes", "resolve_exclude"]

ROOT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, *RECURRENT_TYPES, nn.MultiheadAttention, nn.Embedding,
)

Inputs = Any
"""A tensor, a tuple of positional inputs, or a mapping of keyword inputs."""
Exclude = Iterable[str | nn.Module | type[nn.Module]]
"""Layer names, layers or layer types."""


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model output (tensors, tuples, mappings, ModelOutputs)."""
    return [tuple(t.shape) for t in tensors_of(out)]


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
    units of ``unit_size`` channels: 1; ``head_dim`` when the group runs through an
    ``nn.MultiheadAttention`` (a unit is then a head); or the number of groups when it runs
    through a grouped convolution (a unit is then one position within a group, taken from every
    group). ``unit_of[c]`` is the unit of root channel ``c``.
    """

    key: str
    layers: tuple[str, ...]
    group: tp.Group
    unit_of: torch.Tensor
    units: int
    unit_size: int
    unit_kind: str = "channel"
    """``"channel"``, ``"head"`` (attention) or ``"position"`` (grouped convolutions)."""


class Graph:
    """Torch-Pruning's dependency graph of one model and the groups we may prune in it."""

    def __init__(self, model: nn.Module, example_inputs: Inputs, excluded: set[str], *, count_macs: bool = False):
        """Trace ``model`` once on ``example_inputs``. That one pass also gives the output shapes
        (:attr:`output_shapes`), the layers whose outputs the model returns, and, with
        ``count_macs``, the model's MACs (:attr:`macs`, as :func:`secateurs.measure.count_macs`)."""
        self.model = model
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self.macs: int | None = None
        self.output_shapes: list[tuple[int, ...]] = []
        # Torch-Pruning warns about every op it guesses at; we keep them for error messages.
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            self.dg = self._build(example_inputs, count_macs)
            self.unknown_ops = sorted({str(w.message).split("operation ")[-1].split(" encountered")[0]
                                       for w in caught if "Unknown operation" in str(w.message)})
            self._collect(excluded)

    def _build(self, example_inputs: Inputs, count_macs: bool) -> tp.DependencyGraph:
        produced: list[tuple[nn.Module, weakref.ref]] = []

        def hook(module: nn.Module, _args: Any, out: Any) -> None:
            produced.extend((module, weakref.ref(t)) for t in tensors_of(out))

        def traced(model: nn.Module, inputs: Inputs) -> Any:
            leaves = [m for m in model.modules() if not any(True for _ in m.children())]
            handles = [m.register_forward_hook(hook) for m in leaves]
            names = {m: n for n, m in model.named_modules()}
            stack: list[str] = []
            handles += [m.register_forward_pre_hook(lambda m, _a: stack.append(names[m])) for m in names]
            handles += [m.register_forward_hook(_popper(stack)) for m in names]
            shuffles = _ShuffleWatch(stack)
            try:
                with (MacCounter(model) if count_macs else contextlib.nullcontext()) as counter, shuffles:
                    out = forward(model, inputs)
            except Exception as exc:
                raise _ModelFails(exc) from exc
            finally:
                for h in handles:
                    h.remove()
            if shuffles.found:
                where = ", ".join(repr(n) for n in dict.fromkeys(shuffles.found))
                raise _Refused(
                    f"model: {'layer' if len(set(shuffles.found)) == 1 else 'layers'} {where} shuffle{'s' if len(set(shuffles.found)) == 1 else ''} channels (a reshape that splits the channels into "
                    "groups, then a transpose of the groups), which Torch-Pruning's dependency graph maps "
                    "onto the wrong channels; structured pruning refuses it rather than return a model "
                    "that computes something else; allowed: models without channel shuffles (ShuffleNet "
                    "is not supported)"
                )
            self.macs = counter.macs if counter is not None else None
            outputs = tensors_of(out)
            self.output_shapes = [tuple(t.shape) for t in outputs]
            returned = {id(t) for t in outputs}
            self.output_modules = list(dict.fromkeys(m for m, ref in produced if (t := ref()) is not None and id(t) in returned))
            return out

        try:
            return tp.DependencyGraph().build_dependency(
                self.model,
                example_inputs=example_inputs,
                forward_fn=traced,
                output_transform=tensors_of,
                customized_pruners=customized_pruners(),
            )
        except _Refused as refusal:
            raise SecateursError(str(refusal)) from None
        except _ModelFails as fail:
            exc = fail.args[0]
            raise SecateursError(
                f"example_inputs: the model fails on them ({type(exc).__name__}: {exc}); allowed: "
                "inputs the model accepts, as a tensor, a tuple (positional) or a mapping (keywords)"
            ) from None
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1].name
            raise SecateursError(
                f"model: Torch-Pruning's dependency graph cannot trace it ({type(exc).__name__} "
                f"in {where}: {exc}); structured pruning needs a model the graph can handle"
            ) from None

    def _collect(self, excluded: set[str]) -> None:
        self.fused = {m.qkv: m for m in self.model.modules() if fused_heads(m) is not None}
        protected_nodes, protected_producers = self._output_side()
        for group in self.dg.get_all_groups(root_module_types=ROOT_TYPES):
            key = self._name(group[0].dep.target.module)
            layers = tuple(dict.fromkeys(self._name(item.dep.target.module) for item in group
                                         if self._name(item.dep.target.module)))
            hit = sorted(set(layers) & excluded)
            if hit:
                self.skipped[key] = f"touches excluded {', '.join(hit)}"
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

        Walk back from every sink of the graph, and from every layer whose output the model
        returns (a Transformer's last hidden state also feeds its pooler, so it is no sink),
        through shape-preserving ops (element-wise, reshapes, norms, attention) to the first
        layers that produce channels of their own.
        """
        nodes, producers = set(), set()
        stack = [n for n in self.dg.module2node.values() if not n.outputs]
        stack += [self.dg.module2node[m] for m in self.output_modules if m in self.dg.module2node]
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
            hint = f"pass exclude=[{name!r}] to keep it and the channels it touches intact"
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
                    f"pass exclude=[{key!r}] to keep these channels intact"
                )

    def _channel_group(self, key: str, layers: tuple[str, ...], group: tp.Group) -> ChannelGroup:
        n = root_channels(group)
        attention = [(item, item.dep.target.module) for item in group
                     if isinstance(item.dep.target.module, nn.MultiheadAttention)]
        grouped = [(i, item, item.dep.target.module) for i, item in enumerate(group) if _is_grouped(item.dep.target.module)]
        if grouped and attention:
            names = ", ".join(repr(self._name(m)) for _, m in attention) + ", " + ", ".join(repr(self._name(m)) for _, _, m in grouped)
            raise SecateursError(
                f"layers {names}: attention heads and grouped convolutions share channels, so "
                f"whole heads and whole group positions cannot both be kept; pass exclude=[{key!r}] to keep them intact"
            )
        if grouped:
            return self._grouped_conv_group(key, layers, group, grouped, n)
        # A fused qkv projection (timm Attention, torchvision Swin): its output channel c is
        # head (c % attn_dim) // head_dim of the q, k or v part; a unit is one head of all three.
        fused = [(item, self.fused[m]) for i, item in enumerate(group)
                 if (m := item.dep.target.module) in self.fused and role(group, i) != "in"]
        if not attention and not fused:
            return ChannelGroup(key, layers, group, torch.arange(n), n, 1)
        unit_of = torch.full((n,), -1, dtype=torch.long)
        spans = [(item, m.head_dim, m.embed_dim) for item, m in attention]
        spans += [(item, fused_heads(owner)[1], fused_heads(owner)[0] * fused_heads(owner)[1]) for item, owner in fused]
        names = ", ".join(repr(self._name(item.dep.target.module)) for item, _, _ in spans)
        head_dims = {d for _, d, _ in spans}
        ok = len(head_dims) == 1
        for item, head_dim, width in spans:
            heads = (torch.as_tensor(item.idxs, dtype=torch.long) % width) // head_dim
            root = torch.as_tensor(item.root_idxs, dtype=torch.long)
            ok = ok and bool(((unit_of[root] == -1) | (unit_of[root] == heads)).all())
            unit_of[root] = heads
        sizes = torch.bincount(unit_of[unit_of >= 0])
        ok = ok and bool((unit_of >= 0).all()) and bool((sizes == sizes[0]).all())
        if not ok:
            raise SecateursError(
                f"layers {names}: attention layers share channels but not head boundaries, so "
                f"whole heads cannot be removed; pass exclude=[{names}] to keep them intact"
            )
        return ChannelGroup(key, layers, group, unit_of, len(sizes), int(sizes[0]), "head")

    def _grouped_conv_group(self, key: str, layers: tuple[str, ...], group: tp.Group,
                            grouped: list[tuple[int, Any, nn.Module]], n: int) -> ChannelGroup:
        """Units of a group that runs through grouped convolutions: one unit is one position
        within a convolution group, taken in every group, so each group of every grouped
        convolution loses the same positions and ``groups`` stays valid (as Torch-Pruning does).

        Root channels that land on the same position of some grouped convolution are one unit
        (a union-find over the root channels); units of unequal size are refused."""
        parent = list(range(n))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for i, item, m in grouped:
            width = m.in_channels if role(group, i) == "in" else m.out_channels
            per_group = width // m.groups
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            root = torch.as_tensor(item.root_idxs, dtype=torch.long)
            position = idxs % per_group
            order = torch.argsort(position * n + root)
            pos, rt = position[order].tolist(), root[order].tolist()
            for a in range(1, len(pos)):
                if pos[a] == pos[a - 1]:
                    ra, rb = find(rt[a]), find(rt[a - 1])
                    if ra != rb:
                        parent[ra] = rb
        labels = torch.tensor([find(a) for a in range(n)], dtype=torch.long)
        _, unit_of = torch.unique(labels, return_inverse=True)
        sizes = torch.bincount(unit_of)
        if not bool((sizes == sizes[0]).all()):
            names = ", ".join(repr(self._name(m)) for _, _, m in grouped)
            raise SecateursError(
                f"layers {names}: grouped convolutions share channels with different group layouts, "
                f"so no channel can be removed from every group alike; pass exclude=[{key!r}] to keep them intact"
            )
        return ChannelGroup(key, layers, group, unit_of, len(sizes), int(sizes[0]), "position" if len(sizes) < n else "channel")

    def prune(self, removal: dict[str, torch.Tensor]) -> None:
        """Cut ``removal[key]`` (unit ids) out of every group, in place."""
        by_key = {g.key: g for g in self.groups}
        head_dims = {owner: fused_heads(owner)[1] for owner in self.fused.values()}
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
                    f"exclude=[{key!r}] to keep them intact"
                ) from None
        for owner, head_dim in head_dims.items():  # what their forward reshapes by
            owner.num_heads = owner.qkv.out_features // (3 * head_dim)
            if isinstance(owner.__dict__.get("attn_dim"), int):
                owner.attn_dim = owner.num_heads * head_dim


def fused_heads(module: nn.Module) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` of an attention layer with one fused ``qkv`` Linear whose output
    is q, k and v of ``num_heads`` heads of ``head_dim`` (timm's ``Attention``, torchvision's
    Swin ``ShiftedWindowAttention``), or None for any other module."""
    qkv, heads = getattr(module, "qkv", None), module.__dict__.get("num_heads")
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or heads < 1 or isinstance(module, nn.MultiheadAttention):
        return None
    head_dim = module.__dict__.get("head_dim")
    if not isinstance(head_dim, int):
        if qkv.out_features % (3 * heads):
            return None
        head_dim = qkv.out_features // (3 * heads)
    return (heads, head_dim) if qkv.out_features == 3 * heads * head_dim else None


class _Refused(Exception):
    """The trace found something structured pruning must not cut (message for the user)."""


class _ShuffleWatch(torch.overrides.TorchFunctionMode):
    """Spots channel shuffles during a forward: ``x.view(b, g, c // g, ...)`` of a tensor whose
    dim 1 is split in two, then a transpose (or permute) that swaps those two dims. ``found``
    names the layer running each one (``stack`` is the live module-name stack)."""

    _SPLITS = frozenset({"view", "reshape", "unflatten"})
    _SWAPS = frozenset({"transpose", "swapaxes", "swapdims", "permute"})

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.split: dict[int, weakref.ref] = {}
        self.found: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name not in self._SPLITS and name not in self._SWAPS:
            return out
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            return out
        if name in self._SPLITS:
            if (out.dim() == x.dim() + 1 and x.dim() >= 3 and out.shape[0] == x.shape[0]
                    and out.shape[1] > 1 and out.shape[2] > 1 and out.shape[1] * out.shape[2] == x.shape[1]
                    and out.shape[3:] == x.shape[2:]):
                self.split[id(out)] = weakref.ref(out)
        elif (ref := self.split.get(id(x))) is not None and ref() is x:
            dims = [int(d) for d in args[1:]] if name != "permute" else _permutation(args[1:])
            if name == "permute":
                swapped = len(dims) > 2 and dims[1] == 2 and dims[2] == 1
            else:
                swapped = len(dims) == 2 and sorted(d % x.dim() for d in dims) == [1, 2]
            if swapped:
                self.found.append(self.stack[-1] if self.stack else "<model>")
        return out


def _popper(stack: list[str]) -> Any:
    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:  # a hook that returns None keeps the output
        if stack:
            stack.pop()

    return leave


def _permutation(args: tuple) -> list[int]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return [int(d) for d in args[0]]
    return [int(d) for d in args]


class _ModelFails(Exception):
    """The model's own forward failed during the trace (not the graph)."""


def _is_grouped(module: Any) -> bool:
    """A convolution split into groups that is not depthwise (ResNeXt, RegNet)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module)


def resolve_exclude(model: nn.Module, exclude: Exclude | str, field: str = "exclude") -> set[str]:
    """Names of the layers and parameters ``exclude`` covers (submodules included); errors name ``field``."""
    if isinstance(exclude, (str, nn.Module, type)):
        exclude = [exclude]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    by_id = {id(m): n for n, m in modules.items()}
    out: set[str] = set()

    def cover(prefix: str) -> None:
        out.add(prefix)
        dotted = prefix + "." if prefix else ""
        out.update(n for n in list(modules) + list(params) if n.startswith(dotted))

    for item in exclude:
        if isinstance(item, str):
            if item in modules or item in params:
                cover(item)
                continue
            sample = ", ".join(repr(n) for n in list(modules)[1:6])
            raise SecateursError(f"{field}: got {item!r}; no layer or parameter has that name; allowed: names from model.named_modules(), e.g. {sample}")
        if isinstance(item, nn.Module):
            check(id(item) in by_id, field, type(item).__name__, "layers of the model being pruned")
            cover(by_id[id(item)])
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            names = [n for n, m in modules.items() if isinstance(m, item)]
            check(bool(names), field, item.__name__, "a layer type present in the model")
            for n in names:
                cover(n)
            continue
        raise SecateursError(f"{field}: got {item!r}; allowed: layer names, layers or layer types")
    return out
