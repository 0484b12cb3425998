"""``structured()``: remove whole channels, neurons, hidden units and attention heads.

Masks leave a model as large and as slow as before; this makes it physically smaller. The
dependency graph (:mod:`~secateurs.prune.surgery.graph`) says which parameter slices are coupled;
each coupled channel is scored with a group criterion (:mod:`~secateurs.prune.surgery.criteria`),
:mod:`~secateurs.prune.surgery.select` chooses what to remove (per layer or globally, to a
sparsity, a score threshold or a MACs target) and the graph cuts it out of every coupled layer at
once.

The classifier's outputs and the model's input channels never change: any group whose channels
reach the model output is left intact, and the input is not a layer. After surgery the model is
run once on ``example_inputs``; if a coupling escaped the graph, the call fails with an error
naming the layer, and the caller's model is untouched (surgery happens on a copy).

Sparsities are cumulative: the model returned carries a record of its original size
(:func:`pruning_record`), and ``sparsity=0.5`` always means "half of the *original* channels
gone", so the iterative loop ``prune 0.25 -> fine-tune -> prune 0.5`` ends at half the channels,
not at ``1 - 0.75 * 0.5``. ``target_macs`` is relative to the original MACs in the same way.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> small = structured(net, torch.zeros(1, 8), sparsity=0.5)
>>> small[0].out_features, small[2].out_features, net[0].out_features
(16, 4, 32)
>>> pruning_record(small)["sparsity"]
0.5
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from secateurs._deprecated import renamed_arguments
from secateurs.errors import SecateursError, check, check_choice, check_fraction, check_int
from secateurs.inputs import forward, pairs, plain, to_device
from secateurs.measure import count_params
from secateurs.prune.surgery.criteria import GroupCriterion, make_group_criterion
from secateurs.prune.surgery.graph import (
    ChannelGroup,
    Exclude,
    Graph,
    Inputs,
    output_shapes,
    resolve_exclude,
)
from secateurs.prune.surgery.layers import RECURRENT_TYPES, sync_attributes
from secateurs.prune.surgery.select import Selector, bisect_macs

__all__ = ["RECORD_ATTR", "SCOPES", "channel_groups", "pruning_record", "structured"]

#: Attribute of a pruned model holding its :func:`pruning_record` (a JSON-able dict).
RECORD_ATTR = "_secateurs_structured"
RECORD_VERSION = 1

SCOPES = ("layer", "global")
"""``layer``: every group loses the same fraction; ``global``: one ranking over all groups."""

_RENAMED = {"ratio": "sparsity", "ignore": "exclude", "max_layer_ratio": "max_layer_sparsity"}


def _unit_scores(cg: ChannelGroup, channel_scores: torch.Tensor | None) -> torch.Tensor | None:
    """Mean channel score per unit, or None if the criterion could not score the group."""
    if channel_scores is None:
        return None
    s = channel_scores.to(torch.float64).flatten()
    sums = torch.zeros(cg.units, dtype=torch.float64).index_add_(0, cg.unit_of, s)
    return sums / cg.unit_size


def _score(
    graph: Graph,
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
            for inputs, targets in _batches(batches or (), criterion):
                inputs = to_device(inputs, device)
                if criterion.needs_loss:
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss_fn(forward(model, inputs), to_device(targets, device)).backward()
                else:
                    with torch.no_grad():
                        forward(model, inputs)
                criterion.observe(groups)
                seen += 1
        finally:
            criterion.stop()
            model.zero_grad(set_to_none=True)
    scores = {}
    for cg in graph.groups:
        s = _unit_scores(cg, criterion(cg.group))
        if s is not None:
            scores[cg.key] = s
    return scores

def pruning_record(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`structured` recorded on ``model``: original MACs/params, the fraction of units
    removed so far (``sparsity``) and, per group, the original and kept units
    (``{"version", "macs", "params", "sparsity", "groups": {key: {...}}}``), or None
    for a model that was never structurally pruned. It travels with ``copy.deepcopy`` and with
    :func:`secateurs.prune.save_structured`."""
    record = getattr(model, RECORD_ATTR, None)
    return copy.deepcopy(record) if record is not None else None


def channel_groups(model: nn.Module, example_inputs: Inputs, *, exclude: Exclude = (), **deprecated: Any) -> list[ChannelGroup]:
    """The groups of coupled channels :func:`structured` would prune in ``model`` (a dry run)."""
    exclude = renamed_arguments("channel_groups", deprecated, _RENAMED, {"exclude": exclude or None}).get("exclude", exclude)
    work = copy.deepcopy(model)
    return Graph(work, plain(example_inputs), resolve_exclude(work, exclude)).groups


def structured(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    target_macs: float | None = None,
    criterion: str | GroupCriterion = "magnitude",
    scope: str = "layer",
    exclude: Exclude = (),
    rounds: int = 1,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    max_layer_sparsity: float = 0.9,
    round_to: int = 1,
    **deprecated: Any,
) -> nn.Module:
    """Return a physically smaller copy of ``model`` with whole channels/neurons/heads removed.

    ``model`` itself is not modified (the result is a pruned deep copy that shares no tensor with
    it; build a new optimizer for it). With a data-free criterion the copy borrows ``model``'s
    tensors while it is traced and cut (the model runs in eval mode, nothing writes to them) and
    clones the ones surgery left, so the copy costs about the kept tensors only. Exactly one of:

    - ``sparsity`` in (0, 1): the fraction of channels removed, relative to the original model.
      ``scope="layer"``: from every prunable group (as Torch-Pruning's ``pruning_ratio``);
      ``scope="global"``: across all groups together, ranked by scale-free importance
      (each group's scores divided by their mean).
    - ``threshold``: every unit (channel, neuron, head) whose score is below it is removed, as
      the seeds prune weights below ``threshold = 0.1``; the scope plays no part. The sparsity
      reached is in ``pruning_record(result)["sparsity"]``.
    - ``target_macs`` in (0, 1): prune (with the chosen scope) until at most that fraction of
      the original MACs (as :func:`secateurs.measure.count_macs` counts them) remains, found
      by bisection on the sparsity; whole heads are coarse, so attention models may land below.

    In every case no group loses more than ``max_layer_sparsity`` of its original channels, and
    every group keeps at least one. Sparsity and MACs targets are cumulative across calls: a model
    returned by this function remembers its original size (:func:`pruning_record`), so
    ``structured(structured(m, x, sparsity=0.25), x, sparsity=0.5)`` has half of ``m``'s
    channels, exactly like ``structured(m, x, sparsity=0.5)``. A target already met removes
    nothing.

    The default scope is ``"layer"`` here and ``"global"`` for :class:`~secateurs.prune.Pruner`:
    single weights compare well across layers, but a global channel ranking empties whole
    layers of a network whose layers differ in width (Torch-Pruning defaults to per layer too).

    ``criterion`` is a name from :data:`~secateurs.prune.GROUP_CRITERIA` (``magnitude``,
    ``taylor``, ``taylor_abs``, ``gradient``, ``activation``, ``bn_scale``, ``random``) or a
    :class:`~secateurs.prune.surgery.criteria.GroupCriterion`. The gradient criteria need
    ``batches`` (``(inputs, targets)`` pairs, or mappings of keyword inputs) and use ``loss_fn``
    (default cross-entropy); ``activation`` needs ``batches`` only. ``rounds`` > 1 prunes in that
    many steps within this call (sparsity ``sparsity*k/rounds``, or MACs geometrically towards the
    target), rescoring after each; ``batches`` must then be re-iterable (a list or DataLoader).

    ``exclude`` names layers (or passes layers or layer types) that must keep their exact shape;
    every group that would change them is left intact. Groups feeding the model output (the
    classifier) are always left intact. ``round_to`` keeps channel counts multiples of it.

    Attention (``nn.MultiheadAttention``) is pruned by whole heads; since the module ties
    ``embed_dim`` to ``num_heads * head_dim``, removing a head removes ``head_dim`` channels of
    everything coupled with its embedding (the residual stream of a Transformer block).
    Recurrent layers lose hidden units (the same units in every stacked layer). A fused ``qkv``
    attention (timm's ``Attention``, torchvision's Swin) loses whole heads from q, k and v alike,
    and its ``num_heads`` (and ``attn_dim``) follow; its residual stream (the embedding width)
    is pruned too unless excluded (``exclude=["patch_embed"]`` keeps a timm ViT's width).
    torchvision's ``VisionTransformer.hidden_dim`` follows its ``conv_proj``. A grouped
    convolution (ResNeXt, RegNet) loses the same positions in every group, so ``groups`` stays
    as it was and each group shrinks alike. Channel shuffles (ShuffleNet) are refused:
    Torch-Pruning's graph maps shuffled channels wrongly, and the model it returned would keep
    its output shape while computing something else.

    ``ratio``, ``ignore`` and ``max_layer_ratio`` are the old names of ``sparsity``, ``exclude``
    and ``max_layer_sparsity``; they still work in 0.2, with a DeprecationWarning.
    """
    given = {"sparsity": sparsity, "exclude": exclude or None, "max_layer_sparsity": None}
    old = renamed_arguments("structured", deprecated, _RENAMED, given)
    sparsity = old.get("sparsity", sparsity)
    exclude = old.get("exclude", exclude)
    max_layer_sparsity = old.get("max_layer_sparsity", max_layer_sparsity)
    _validate(sparsity, threshold, target_macs, scope, rounds, max_layer_sparsity, round_to)
    example_inputs = plain(example_inputs)
    crit = make_group_criterion(criterion)
    if crit.needs_data:
        check(batches is not None, "batches", None, f"an iterable of (inputs, targets) batches: criterion {crit.name!r} reads data")
        if batches is not None and iter(batches) is batches:
            batches = list(batches)  # scored once per round and per bisection: must be re-iterable
    loss = loss_fn or F.cross_entropy
    training = {name: m.training for name, m in model.named_modules()}
    excluded = resolve_exclude(model, exclude)
    # Data-free criteria never write to the tensors, so the copy shares them until surgery
    # (which makes new ones for every pruned layer); the rest are cloned afterwards.
    work, shared = _copy(model, share_tensors=not crit.needs_data)
    _refuse_untraceable(work)
    record = pruning_record(model) or {"version": RECORD_VERSION, "groups": {}}
    expected: list[tuple[int, ...]] = []
    start_macs = 0
    try:
        for k in range(1, rounds + 1):
            first = k == 1
            # The first trace also gives the output shapes and the MACs (one pass for all three).
            graph = Graph(work, example_inputs, excluded, count_macs=first and ("macs" not in record or target_macs is not None))
            if first:
                expected = graph.output_shapes
                if "macs" not in record:
                    record["macs"] = graph.macs
                    record["params"] = count_params(work)
                start_macs = graph.macs or 0
            _check_prunable(graph, exclude)
            for cg in graph.groups:
                record["groups"].setdefault(cg.key, {"units": cg.units, "unit": cg.unit_kind, "layers": list(cg.layers)})
            scores = _score(graph, crit, batches, loss)
            check(bool(scores), "criterion", crit.name, "a criterion that scores at least one group (bn_scale needs BatchNorm/LayerNorm layers)")
            select = Selector(graph.groups, scores, {key: g["units"] for key, g in record["groups"].items()},
                              scope, max_layer_sparsity, round_to)
            if sparsity is not None:
                removal = select(sparsity * k / rounds)
            elif threshold is not None:
                removal = select.below(threshold)
            else:
                assert target_macs is not None
                goal = start_macs * (target_macs * record["macs"] / start_macs) ** (k / rounds)
                removal = bisect_macs(work, example_inputs, excluded, select, goal, target_macs, record["macs"])
            graph.prune(removal)
            sync_attributes(work)
            problem = _verify(work, example_inputs, expected, graph)
            if problem is not None:
                layers = _culprits(model, example_inputs, excluded, expected, removal, graph.groups)
                groups = ", ".join(repr(k) for k in dict.fromkeys(layers.values()))
                raise SecateursError(f"{problem}; keeping the channels of {groups} intact fixes it: pass exclude={list(layers)!r}")
            for cg in graph.groups:
                record["groups"][cg.key]["kept"] = cg.units - len(removal.get(cg.key, ()))
    finally:
        _own_tensors(work, shared)
        for name, m in work.named_modules():
            m.training = training.get(name, m.training)
    record["sparsity"] = _reached(record)
    setattr(work, RECORD_ATTR, record)
    return work


def _copy(model: nn.Module, *, share_tensors: bool) -> tuple[nn.Module, set[int]]:
    """A deep copy of ``model`` and the ids of the tensors it still shares with it (all its
    parameters and buffers with ``share_tensors``, else none)."""
    if not share_tensors:
        return copy.deepcopy(model), set()
    tensors = [*model.parameters(), *model.buffers()]
    memo: dict[int, Any] = {id(t): t for t in tensors}
    return copy.deepcopy(model, memo), {id(t) for t in tensors}


def _own_tensors(work: nn.Module, shared: set[int]) -> None:
    """Clone every parameter and buffer of ``work`` that is still one of the original model's
    (ties kept), so the result shares no storage with the caller's model."""
    if not shared:
        return
    clones: dict[int, torch.Tensor] = {}
    for m in work.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is None or id(t) not in shared:
                    continue
                if id(t) not in clones:
                    if isinstance(t, nn.Parameter):
                        clone = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                    else:
                        clone = t.clone()
                    clones[id(t)] = clone
                store[name] = clones[id(t)]
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()  # its flat list still names the shared tensors


def _reached(record: dict[str, Any]) -> float:
    """Fraction of the original units removed, over every group pruned so far."""
    groups = [g for g in record["groups"].values() if "kept" in g]
    total = sum(g["units"] for g in groups)
    return round(1.0 - sum(g["kept"] for g in groups) / total, 6) if total else 0.0


def _batches(batches: Iterable[Any], criterion: GroupCriterion) -> Iterable[tuple[Any, Any]]:
    try:
        yield from pairs(batches)
    except SecateursError as err:
        if "got no batch" not in str(err):
            raise
        check(False, "batches", "an empty iterable", f"at least one (inputs, targets) batch for criterion {criterion.name!r}")


def _refuse_untraceable(model: nn.Module) -> None:
    """Layers whose internals Torch-Pruning's graph misreads (it traces into them)."""
    for name, m in model.named_modules():
        if isinstance(m, RECURRENT_TYPES) and (m.bidirectional or m.proj_size):
            raise SecateursError(
                f"layer {name!r}: {type(m).__name__}(bidirectional={m.bidirectional}, "
                f"proj_size={m.proj_size}) is not supported by structured pruning; allowed: "
                "unidirectional RNN/LSTM/GRU without proj_size"
            )


def _validate(
    sparsity: float | None, threshold: float | None, target_macs: float | None, scope: str, rounds: int,
    max_layer_sparsity: float, round_to: int,
) -> None:
    given = {"sparsity": sparsity, "threshold": threshold, "target_macs": target_macs}
    check(sum(v is not None for v in given.values()) == 1, "sparsity/threshold/target_macs",
          tuple(given.values()), "exactly one of them")
    if sparsity is not None:
        check_fraction(sparsity, "sparsity", low_open=True)
    if threshold is not None:
        check(isinstance(threshold, int | float) and not isinstance(threshold, bool) and threshold == threshold,
              "threshold", threshold, "a number: units scoring below it are removed")
    if target_macs is not None:
        check(isinstance(target_macs, int | float) and 0.0 < target_macs < 1.0, "target_macs", target_macs, "a fraction of the original MACs in (0, 1)")
    check_choice(scope, "scope", SCOPES)
    check_int(rounds, "rounds", minimum=1)
    check_fraction(max_layer_sparsity, "max_layer_sparsity", low_open=True, high_open=False)
    check_int(round_to, "round_to", minimum=1)


def _check_prunable(graph: Graph, exclude: Any) -> None:
    if graph.groups:
        return
    why = "; ".join(f"{k}: {v}" for k, v in graph.skipped.items()) or "no Conv/Linear/RNN/attention layer found"
    raise SecateursError(
        f"exclude: got {list(exclude) if not isinstance(exclude, str) else exclude!r}; nothing is left to prune ({why}); "
        "allowed: a model with at least one prunable layer that does not feed the output directly"
    )

def _shapes_on_meta(model: nn.Module, example_inputs: Inputs) -> list[tuple[int, ...]] | None:
    """The output shapes of ``model`` run with every parameter, buffer and input on the meta
    device (shapes only, no arithmetic: a tenth of a real pass on a busy CPU), or None where the
    forward cannot run on meta (a value read with ``.item()``, a tensor the model makes on its
    own device, an op without a meta kernel)."""
    state = {name: t.to("meta") for name, t in (*model.named_parameters(), *model.named_buffers())}
    def on_meta(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(model, state, args, kwargs, tie_weights=True, strict=False)

    try:
        with torch.no_grad(), warnings.catch_warnings(), _ConvChannels():
            warnings.simplefilter("ignore")
            return output_shapes(forward(on_meta, to_device(example_inputs, "meta")))  # inputs spread as for the real pass
    except Exception:
        return None


_CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}


class _ConvChannels(torch.overrides.TorchFunctionMode):
    """Raises where a convolution's input channels or bias disagree with its weight: the meta
    kernels of ``conv_transpose*`` accept wrong input channels and those of every convolution a
    bias of the wrong length, which a real pass refuses."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        dims = _CONV_DIMS.get(name)
        if dims is not None and len(args) >= 2:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)  # 7th in both signatures
            groups = groups if isinstance(groups, int) else 1
            channels = x.shape[-(dims + 1)]
            if not name.startswith("conv_transpose"):
                ok = channels == weight.shape[1] * groups and (bias is None or bias.numel() == weight.shape[0])
            else:
                ok = channels == weight.shape[0] and (bias is None or bias.numel() == weight.shape[1] * groups)
            if not ok:
                raise RuntimeError(f"{name}: input channels or bias disagree with the weight")
        return func(*args, **kwargs)


def _verify(model: nn.Module, example_inputs: Inputs, expected: list[tuple[int, ...]], graph: Graph) -> str | None:
    """Check the pruned model: None if it runs and its outputs keep their shapes, else what
    went wrong, naming the layer where a missed coupling shows up. The shapes are checked on the
    meta device first; only a model that fails there (or changes its output shapes) is run for
    real, which decides and names the layer."""
    model.eval()
    if _shapes_on_meta(model, example_inputs) == expected:
        return None
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names[module])

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            got = output_shapes(forward(model.eval(), example_inputs))
    except Exception as exc:
        where = stack[-1] if stack else "<model>"
        layer = f"{where!r} ({type(dict(model.named_modules())[where]).__name__})" if stack else where
        return (f"layer {layer}: the pruned model fails here ({type(exc).__name__}: {exc}); "
                f"Torch-Pruning's dependency graph misread the channels reaching it ({_suspects(graph)})")
    finally:
        for h in hooks:
            h.remove()
    if got == expected:
        return None
    return (f"model output: shapes changed from {expected} to {got} after pruning: pruned channels reach "
            f"the output through an op the dependency graph cannot follow ({_suspects(graph)})")


def _suspects(graph: Graph) -> str:
    return graph.suspects(cg.group for cg in graph.groups)


def _breaks(model: nn.Module, example_inputs: Inputs, excluded: set[str], expected: list[tuple[int, ...]],
            removal: dict[str, torch.Tensor]) -> bool:
    """Whether cutting ``removal`` out of a copy of ``model`` makes it fail or change its output shapes."""
    trial = copy.deepcopy(model)
    Graph(trial, example_inputs, excluded).prune(removal)
    try:
        with torch.no_grad():
            return output_shapes(forward(trial.eval(), example_inputs)) != expected
    except Exception:
        return True


def _culprits(model: nn.Module, example_inputs: Inputs, excluded: set[str], expected: list[tuple[int, ...]],
              removal: dict[str, torch.Tensor], groups: Sequence[ChannelGroup]) -> dict[str, str]:
    """The smallest set of layers whose exclusion keeps the pruned model working: the groups whose
    removal breaks it, found by bisection over ``removal`` on copies of ``model``, each named by the
    shortest layer that belongs to that group alone among ``groups`` (the graph's groups, whose
    names do not change when they are cut) (``{layer: group key}``)."""

    def find(keys: list[str]) -> list[str]:
        if not _breaks(model, example_inputs, excluded, expected, {k: removal[k] for k in keys}):
            return []
        if len(keys) == 1:
            return keys
        half = len(keys) // 2
        return find(keys[:half]) + find(keys[half:])

    culprits = find([k for k, v in removal.items() if len(v)]) or list(removal)
    elsewhere = {layer for cg in groups if cg.key not in culprits for layer in cg.layers}
    named: dict[str, str] = {}
    for cg in groups:
        if cg.key in culprits:
            own = [layer for layer in cg.layers if layer not in elsewhere]
            named[min(own, key=lambda n: (len(n), n)) if own else cg.key] = cg.key
    return named
