"""Importance criteria: a score per weight, higher means keep.

Each criterion is a small class registered by name in :data:`CRITERIA`; adding one means
writing a class and decorating it with ``@register("name")`` (a name already taken is an error
unless ``replace=True``). The :class:`~secateurs.prune.Pruner`
drives a criterion through four calls:

1. ``bind(model, targets)`` once;
2. ``observe(batches, loss_fn)`` from ``Pruner.score`` (data criteria accumulate statistics);
3. ``prepare(masks)`` before a selection (under ``torch.distributed`` the data statistics are
   all-reduced here, so every rank selects the same masks), then ``chunk(i, start, stop)`` for
   the scores of flat elements ``start:stop`` of target ``i``, then ``release()``.
4. ``state_dict()`` / ``load_state_dict()`` to checkpoint what was accumulated.

=============  =======================================================================
``magnitude``  ``|w|`` (``p=1``) or ``w**2`` (``p=2``)
``gradient``   ``mean_b |dL_b/dw|`` over the scored batches ``b``
``activation`` ``|w| * mean |x|``, ``x`` the input that ``w`` multiplies (sum |activation x weight|)
``taylor``     ``|w * mean_b dL_b/dw|`` (first-order Taylor; SNIP when scored at initialisation)
``movement``   ``-sum_t w_t * g_t`` over fine-tuning steps (Sanh et al. 2020)
``random``     uniform in [0, 1), reproducible from ``seed``
``synflow``    ``|w * dR/dw|``, ``R`` the output sum of the all-positive network on an all-ones
               input, iterated (Tanaka et al. 2020); needs no data, only the input shape
=============  =======================================================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from secateurs.errors import SecateursError, check, check_int
from secateurs.inputs import forward, pairs, to_device
from secateurs.prune.activations import ActivationStats
from secateurs.prune.masks import Target
from secateurs.prune.selection import CHUNK
from secateurs.registry import Registry

__all__ = [
    "CRITERIA",
    "REGISTRY",
    "ActivationCriterion",
    "Criterion",
    "GradientCriterion",
    "LossFn",
    "MagnitudeCriterion",
    "MovementCriterion",
    "RandomCriterion",
    "SynFlowCriterion",
    "TaylorCriterion",
    "make_criterion",
    "register",
]

LossFn = Callable[[Any, Any], torch.Tensor]

CRITERIA: Registry[Criterion] = Registry("criterion", field="criterion")
"""Mask criteria by name, the ones users registered included."""

REGISTRY = CRITERIA
"""Deprecated alias of :data:`CRITERIA` (removed in secateurs 0.3)."""


def register(name: str | type[Criterion], *, replace: bool = False) -> Any:
    """Class decorator: ``@register("name")`` makes a :class:`Criterion` available by name.

    A name already registered is an error unless ``replace=True``. The old bare form
    ``@register`` on a class with a ``name`` attribute still works in 0.2, with a
    DeprecationWarning.
    """
    if isinstance(name, type):
        import warnings

        warnings.warn(
            "@register without a name is deprecated (removed in secateurs 0.3); use @register(\"name\")",
            DeprecationWarning,
            stacklevel=2,
        )
        return CRITERIA.register(name.name, replace=replace)(name)
    return CRITERIA.register(name, replace=replace)


class Criterion:
    """Base class. Subclasses are registered with ``@register("name")`` and implement :meth:`chunk`."""

    name: ClassVar[str] = ""
    requires_data: ClassVar[bool] = False
    """True when :meth:`observe` must see data before a selection."""
    signed: ClassVar[bool] = False
    """True when scores may be negative."""
    iterations: int = 1
    """Selection rounds per pruning step (each round re-scores under the new masks)."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.targets: list[Target] = []

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        self.model = model
        self.targets = list(targets)

    def observe(self, batches: Iterable[Any], loss_fn: LossFn | None, *, max_batches: int | None = None) -> int:
        """Accumulate statistics from ``(inputs, targets)`` batches; returns how many were seen."""
        return 0

    def ready(self) -> bool:
        return True

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        """Called before each selection round with the current keep-masks."""

    def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Scores of flat elements ``start:stop`` of target ``index`` (floating point)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop whatever :meth:`prepare` computed."""

    def finish(self) -> None:
        """Called once a whole pruning step (all its rounds) is done."""

    def scores(self, masks: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every score, shaped like its weight (for inspection and tests; selection uses chunks)."""
        if masks is None:
            masks = [torch.ones(t.shape, dtype=torch.bool, device=t.param.device) for t in self.targets]
        self.prepare(masks)
        try:
            return {
                t.name: self.chunk(i, 0, t.numel).reshape(t.shape).clone()
                for i, t in enumerate(self.targets)
            }
        finally:
            self.release()

    def options(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise SecateursError(
                f"criterion: got state of {state.get('name')!r}; allowed: state saved by {self.name!r}"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard) gathered into the whole tensor; other tensors unchanged."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def _all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum of each tensor over all ranks, with one collective (returns new tensors)."""
    if _world() == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


@register("magnitude")
class MagnitudeCriterion(Criterion):
    """``|w|`` for ``p=1`` (L1), ``w**2`` for ``p=2`` (L2): the same ranking of single weights."""


    def __init__(self, p: int = 1):
        super().__init__()
        if p not in (1, 2):
            raise SecateursError(f"p: got {p!r}; allowed: 1 (L1) or 2 (L2)")
        self.p = p
        self._weights: list[torch.Tensor] = []

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        # a weight sharded by FSDP2 is a DTensor: gather it once per selection, not per chunk
        self._weights = [_whole(t.param.detach()) for t in self.targets]

    def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
        weight = self._weights[index] if self._weights else self.targets[index].param.detach()
        weight = weight.reshape(-1)[start:stop]
        return weight.abs() if self.p == 1 else weight.square()

    def release(self) -> None:
        self._weights = []

    def options(self) -> dict[str, Any]:
        return {"p": self.p}


class _DataCriterion(Criterion):
    """Scores from statistics summed over scored batches (and, for movement, training steps).

    Statistics describe the weights they were measured on, so they are dropped after each
    pruning step and the next step needs a fresh ``score()``; movement, whose score is by
    definition a sum over the whole of fine-tuning, keeps accumulating instead.
    """

    requires_data = True
    accumulates: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.sums: list[torch.Tensor | None] = []
        self.count = 0
        self._synced: list[torch.Tensor] | None = None
        self._cache: dict[int, torch.Tensor] = {}

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        super().bind(model, targets)
        self.sums = [None] * len(self.targets)
        self.count = 0

    def ready(self) -> bool:
        return self.count > 0

    def _device(self) -> torch.device:
        return self.targets[0].param.device

    def _add(self, index: int, value: torch.Tensor) -> None:
        # an FSDP2 gradient is a DTensor shard: statistics are kept whole, like the masks
        value = _whole(value.detach()).to(torch.float32)
        current = self.sums[index]
        if current is None:
            self.sums[index] = value.clone()
        else:
            current.add_(value)

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        sums = [s if s is not None else torch.zeros(t.shape, device=t.param.device) for s, t in zip(self.sums, self.targets, strict=True)]
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self._device())
        *sums, count = _all_reduce_sum([*sums, count])
        self._synced = [*sums, count]
        self._cache = {}

    def _statistic(self, index: int) -> tuple[torch.Tensor, float]:
        assert self._synced is not None, "prepare() first"
        return self._synced[index], float(self._synced[-1])

    def _score(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
        score = self._cache.get(index)
        if score is None:
            score = self._cache[index] = self._score(index).reshape(-1)
        return score[start:stop]

    def release(self) -> None:
        self._synced = None
        self._cache = {}

    def finish(self) -> None:
        if not self.accumulates:
            self.reset()

    def reset(self) -> None:
        """Forget every statistic (the next step needs a new ``score()``)."""
        self.sums = [None] * len(self.targets)
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        sums = {t.name: s for t, s in zip(self.targets, self.sums, strict=True) if s is not None}
        return super().state_dict() | {"count": self.count, "sums": sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        names = [t.name for t in self.targets]
        unknown = sorted(set(state.get("sums", {})) - set(names))
        if unknown:
            raise SecateursError(f"state['sums']: got {unknown}; allowed: {names}")
        self.count = int(state.get("count", 0))
        self.sums = [
            state["sums"][n].to(t.param.device, torch.float32).clone() if n in state.get("sums", {}) else None
            for n, t in zip(names, self.targets, strict=True)
        ]


def _gradients(model: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]) -> Sequence[torch.Tensor | None]:
    """``d loss / d params``, leaving the model's ``.grad`` as it was.

    Under FSDP2 (DTensor parameters) ``torch.autograd.grad`` would return each rank's own
    gradient, shard by shard, and no rank holds the other shards of its gradient; so there
    ``backward()`` runs instead, whose hooks reduce-scatter the gradient averaged over the
    ranks (what the optimizer steps with), and ``.grad`` is put back afterwards.
    """
    if not any(hasattr(p, "full_tensor") for p in params):  # no DTensor: no FSDP2
        return torch.autograd.grad(loss, params, allow_unused=True)
    everything = list(model.parameters())
    saved = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, g in zip(everything, saved, strict=True):
            p.grad = g


class _GradientStatistic(_DataCriterion):
    """Data criteria computed from the loss gradient of each scored batch."""

    def observe(self, batches: Iterable[Any], loss_fn: LossFn | None, *, max_batches: int | None = None) -> int:
        if not callable(loss_fn):
            raise SecateursError(
                f"loss_fn: got {loss_fn!r}; allowed: a callable loss_fn(outputs, targets) -> scalar "
                f"tensor (criterion {self.name!r} needs gradients)"
            )
        assert self.model is not None
        device = self._device()
        params = [t.param for t in self.targets]
        live = [i for i, p in enumerate(params) if p.requires_grad]
        seen = 0
        for inputs, labels in pairs(batches, max_batches):
            loss = loss_fn(forward(self.model, to_device(inputs, device)), to_device(labels, device))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise SecateursError(f"loss_fn: returned {type(loss).__name__} {getattr(loss, 'shape', '')}; allowed: a scalar tensor")
            grads = _gradients(self.model, loss, [params[i] for i in live])
            with torch.no_grad():
                for i, grad in zip(live, grads, strict=True):
                    if grad is not None:
                        self._accumulate(i, params[i].detach(), grad)
            self.count += 1
            seen += 1
        return seen

    def _accumulate(self, index: int, weight: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError


@register("gradient")
class GradientCriterion(_GradientStatistic):
    """``|dL/dw|`` averaged over the scored batches (the seeds' gradient-magnitude pruning)."""


    def _accumulate(self, index: int, weight: torch.Tensor, grad: torch.Tensor) -> None:
        self._add(index, grad.abs())

    def _score(self, index: int) -> torch.Tensor:
        total, count = self._statistic(index)
        return total / count


@register("activation")
class ActivationCriterion(_DataCriterion):
    """``|w| * mean |x|`` where ``x`` is the input ``w`` multiplies: the seeds' importance
    ``sum |activation x weight|`` (up to the number of samples). Needs inputs, not labels."""


    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        super().bind(model, targets)
        self.stats = ActivationStats(model, self.targets)

    def reset(self) -> None:
        super().reset()
        self.stats = ActivationStats(self.model, self.targets)  # type: ignore[arg-type]

    def observe(self, batches: Iterable[Any], loss_fn: LossFn | None, *, max_batches: int | None = None) -> int:
        assert self.model is not None
        device = self._device()
        seen = 0
        with torch.no_grad(), self.stats.record():
            for inputs, _ in pairs(batches, max_batches):
                forward(self.model, to_device(inputs, device))
                seen += 1
        missing = self.stats.missing()
        if missing:
            raise SecateursError(
                f"criterion: got 'activation' but {', '.join(missing)} never ran during score(); "
                "allowed: targets that the model's forward uses (exclude the others)"
            )
        self.count += seen
        return seen

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        totals = [s.total for s in self.stats.stats.values()]
        counts = [s.count for s in self.stats.stats.values()]
        synced = _all_reduce_sum([*totals, *counts])  # type: ignore[list-item]
        self._synced = synced
        self._cache = {}

    def _score(self, index: int) -> torch.Tensor:
        assert self._synced is not None
        n = len(self.targets)
        target = self.targets[index]
        stat = self.stats.stats[target.name]
        mean = (self._synced[index] / self._synced[n + index]).to(target.param.device)
        weight = _whole(target.param.detach()).abs().to(torch.float32)
        return (weight.reshape(stat.weight_view) * mean).reshape(target.shape)

    def state_dict(self) -> dict[str, Any]:
        stats = {
            name: {"total": s.total, "count": s.count}
            for name, s in self.stats.stats.items()
            if s.total is not None
        }
        return Criterion.state_dict(self) | {"count": self.count, "stats": stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        Criterion.load_state_dict(self, state)
        unknown = sorted(set(state.get("stats", {})) - set(self.stats.stats))
        if unknown:
            raise SecateursError(f"state['stats']: got {unknown}; allowed: {sorted(self.stats.stats)}")
        self.count = int(state.get("count", 0))
        for name, stat in self.stats.stats.items():
            saved = state.get("stats", {}).get(name)
            stat.total = None if saved is None else saved["total"].clone()
            stat.count = None if saved is None else saved["count"].clone()


@register("taylor")
class TaylorCriterion(_GradientStatistic):
    """``|w * g|`` with ``g`` the mean gradient over the scored batches: the first-order estimate
    of the loss change when ``w`` is removed. Scored at initialisation this is SNIP."""


    def _accumulate(self, index: int, weight: torch.Tensor, grad: torch.Tensor) -> None:
        self._add(index, grad)

    def _score(self, index: int) -> torch.Tensor:
        total, count = self._statistic(index)
        weight = _whole(self.targets[index].param.detach()).to(torch.float32)
        return (weight * (total / count)).abs()


@register("movement")
class MovementCriterion(_GradientStatistic):
    """``-sum_t w_t * g_t``: weights moving away from zero score high (Sanh et al. 2020).

    Accumulated at every optimizer step once the pruner is attached to the optimizer, and over
    scored batches; averaged over ranks under ``torch.distributed``.
    """

    signed = True
    accumulates = True

    def _accumulate(self, index: int, weight: torch.Tensor, grad: torch.Tensor) -> None:
        # on FSDP2 shards (DTensors) the product is taken shard by shard, then gathered
        self._add(index, -(weight.to(torch.float32) * grad.to(torch.float32)))

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """Add ``-w * g`` from the current ``.grad`` (called before the optimizer updates)."""
        for i, target in enumerate(self.targets):
            param = target.param
            if param.grad is not None and param.grad.layout == torch.strided:
                self._accumulate(i, param.detach(), param.grad)
        self.count += 1

    def _score(self, index: int) -> torch.Tensor:
        total, _ = self._statistic(index)
        return total / _world()


@register("random")
class RandomCriterion(Criterion):
    """Uniform random scores. Each pruning step draws afresh; ``seed`` makes it reproducible
    (``None`` takes one from torch's global generator when bound, broadcast from rank 0)."""


    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed
        self.draws = 0

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        super().bind(model, targets)
        if self.seed is None:
            seed = torch.randint(0, 2**31 - 1, (1,))
            if _world() > 1:
                dist.broadcast(seed, src=0)
            self.seed = int(seed)

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        self.draws += 1

    def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
        # Scores are generated per fixed block of CHUNK from a seed derived from (seed, draw,
        # target, block), so any slice, in any order, sees the same numbers.
        device = self.targets[index].param.device
        pieces = []
        for block in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            lo = block * CHUNK
            hi = min(lo + CHUNK, self.targets[index].numel)
            g = torch.Generator().manual_seed(hash((self.seed, self.draws, index, block)) & (2**63 - 1))
            pieces.append(torch.rand(hi - lo, generator=g)[max(start - lo, 0) : stop - lo])
        return torch.cat(pieces).to(device)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = state["options"]["seed"]
        self.draws = int(state.get("draws", 0))


@register("synflow")
class SynFlowCriterion(Criterion):
    """Iterative synaptic flow (Tanaka et al. 2020): data-free, avoids layer collapse.

    Each round takes a copy of the model with every parameter and buffer replaced by its
    absolute value (pruned weights zero), feeds a single all-ones input in float64, and scores
    ``|w * dR/dw|`` with ``R`` the sum of the outputs. A step of the pruner runs ``iterations``
    rounds, shrinking the density exponentially towards the target. The input shape (without the
    batch dimension) is given here or taken from the first batch passed to ``Pruner.score``.
    """


    def __init__(self, iterations: int = 100, input_shape: Sequence[int] | None = None):
        super().__init__()
        self.iterations = check_int(iterations, "iterations", minimum=1)
        self.input_shape = None if input_shape is None else tuple(int(v) for v in input_shape)
        self._copy: nn.Module | None = None
        self._scores: list[torch.Tensor] = []

    def observe(self, batches: Iterable[Any], loss_fn: LossFn | None, *, max_batches: int | None = None) -> int:
        if self.input_shape is None:
            inputs, _ = next(pairs(batches, 1))
            if not isinstance(inputs, torch.Tensor):
                raise SecateursError(
                    f"criterion: got 'synflow' with inputs of type {type(inputs).__name__}; allowed: "
                    "a single input tensor"
                )
            self.input_shape = tuple(inputs.shape[1:])
        return 0

    def ready(self) -> bool:
        return self.input_shape is not None

    def prepare(self, masks: Sequence[torch.Tensor]) -> None:
        if self.input_shape is None:
            raise SecateursError(
                "criterion: got 'synflow' without an input shape; allowed: "
                "SynFlowCriterion(input_shape=(C, H, W)) or call Pruner.score(batches) first"
            )
        assert self.model is not None
        if any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            self._scores = self._sharded_scores(masks)
            return
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).double().eval()
            self._names = [t.name for t in self.targets]
            with torch.no_grad():
                for value in self._copy.state_dict().values():
                    if value.is_floating_point():
                        value.abs_()
        copied = dict(self._copy.named_parameters())
        weights = [copied[name] for name in self._names]
        with torch.no_grad():
            for weight, mask, target in zip(weights, masks, self.targets, strict=True):
                weight.copy_(target.param.detach().abs() * mask)
        device = weights[0].device
        self._copy.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = self._output(self._copy, torch.float64, device)
            grads = torch.autograd.grad(out.sum(), weights, allow_unused=True)
        self._scores = [
            (torch.zeros_like(w) if g is None else (g * w).abs()).reshape(-1)
            for w, g in zip(weights, grads, strict=True)
        ]

    def _output(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = model(torch.ones((1, *self.input_shape), dtype=dtype, device=device))  # type: ignore[misc]
        if not isinstance(out, torch.Tensor):
            raise SecateursError(
                f"criterion: got 'synflow' on a model returning {type(out).__name__}; allowed: "
                "a model whose forward returns one tensor"
            )
        return out

    def _sharded_scores(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The scores of a model whose parameters are DTensors (FSDP2 ``fully_shard``).

        Such a model cannot be copied whole (no rank holds it), so the all-positive network is
        the model itself: every rank sets its shards to ``|w|`` (pruned weights zero), runs the
        all-ones forward and backward through the sharded module, all ranks together (FSDP2
        gathers the weights and reduce-scatters ``dR/dw``: every rank has the same input, so the
        rank average is ``dR/dw``), and puts its shards, buffers, gradients and train/eval flags
        back exactly. It runs in the parameters' dtype, not float64 as the copy does: the
        sharded parameters' dtype is fixed by ``fully_shard``.
        """
        from torch.distributed.tensor import distribute_tensor

        model = self.model
        assert model is not None
        params = list(model.parameters())
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        weights = [t.param for t in self.targets]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            saved_buffers = [b.clone() for b in buffers]
        grads = [p.grad for p in params]
        modes = [(m, m.training) for m in model.modules()]
        try:
            with torch.no_grad():
                for p in params:
                    if p.is_floating_point():
                        p.abs_()
                for b in buffers:
                    b.abs_()
                for w, mask in zip(weights, masks, strict=True):
                    keep = mask.to(w.dtype)
                    if hasattr(w, "full_tensor"):  # the same mask on every rank: no scatter
                        keep = distribute_tensor(keep, w.device_mesh, w.placements, src_data_rank=None)
                    w.mul_(keep)
            for p in params:
                p.grad = None
            model.eval()
            with torch.enable_grad():
                self._output(model, weights[0].dtype, weights[0].device).sum().backward()
            with torch.no_grad():
                return [
                    (torch.zeros(t.numel, dtype=w.dtype, device=w.device) if w.grad is None
                     else _whole((w.grad * w).abs()).reshape(-1))
                    for w, t in zip(weights, self.targets, strict=True)
                ]  # fmt: skip
        finally:
            with torch.no_grad():
                for p, value, grad in zip(params, saved, grads, strict=True):
                    p.copy_(value)
                    p.grad = grad
                for b, value in zip(buffers, saved_buffers, strict=True):
                    b.copy_(value)
            for m, training in modes:
                m.training = training

    def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
        return self._scores[index][start:stop]

    def release(self) -> None:
        self._scores = []

    def finish(self) -> None:
        """Drop the model copy (called once a whole pruning step is done)."""
        self._copy = None

    def options(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "input_shape": None if self.input_shape is None else list(self.input_shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        shape = state["options"].get("input_shape")
        self.input_shape = None if shape is None else tuple(shape)
        self.iterations = int(state["options"].get("iterations", self.iterations))


def make_criterion(criterion: str | Criterion, **options: Any) -> Criterion:
    """A criterion instance from a name (with constructor ``options``) or an instance.

    >>> make_criterion("magnitude", p=2)
    MagnitudeCriterion(p=2)
    """
    if isinstance(criterion, Criterion):
        return criterion
    check(isinstance(criterion, str) and criterion in CRITERIA, "criterion", criterion,
          f"{', '.join(CRITERIA)} or a Criterion instance")
    return CRITERIA.build(criterion, **options)
