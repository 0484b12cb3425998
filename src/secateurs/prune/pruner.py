"""The :class:`Pruner`: shaped like an optimizer, it owns the masks of one model.

``step()`` scores the targeted weights with its criterion, selects the lowest-scoring ones
(over all targets together, or layer by layer, optionally in N:M blocks) or every one scoring
below an absolute threshold, and zeroes them in place. ``attach(optimizer)`` keeps them at zero
while that optimizer trains the model (and, for an optimizer with a pre-clip hook such as
:func:`secateurs.clip.wrap`'s, zeroes their gradients before the clipping rule sees them). The model itself is never wrapped or hooked, so its state_dict keys,
``copy.deepcopy`` and pickle behave exactly as for an unpruned model.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from secateurs.errors import SecateursError, check, check_choice, check_fraction, check_int
from secateurs.prune.criteria import Criterion, LossFn, make_criterion
from secateurs.prune.masks import (
    Target,
    apply_masks_,
    find_targets,
    mask_grads_,
    mask_optimizer_state_,
)
from secateurs.prune.selection import CHUNK, nm_keep, parse_pattern, prune_lowest_

__all__ = ["SCOPES", "Pruner", "check_sparsity"]

SCOPES: tuple[str, ...] = ("global", "layer")
"""``global``: one ranking over every targeted weight; ``layer``: each weight tensor on its own."""

_STATE_VERSION = 1


def check_sparsity(value: object, field: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), or :class:`SecateursError` naming ``field``."""
    return check_fraction(value, field)


def check_threshold(value: object, field: str = "threshold") -> float:
    """``value`` as a finite float (weights scoring below it are pruned)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    check(ok, field, value, "a finite number: targeted weights scoring below it are pruned")
    return float(value)  # type: ignore[arg-type]


class _BeforeStep:
    """Optimizer pre-step hook: movement scores, then pruned gradients and state to zero."""

    def __init__(self, pruner: Pruner):
        self.pruner = pruner

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.pruner._before_optimizer_step(optimizer)


class _BeforeClip:
    """Pre-clip hook of a wrapped optimizer: pruned gradients to zero before the rule's norm."""

    def __init__(self, pruner: Pruner):
        self.pruner = pruner

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        self.pruner.mask_grads_()


class _AfterStep:
    """Optimizer post-step hook: pruned weights back to exactly zero, whatever the optimizer did."""

    def __init__(self, pruner: Pruner):
        self.pruner = pruner

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.pruner.apply_()


class Pruner:
    """Unstructured pruning of a model's weights to a target sparsity or below a threshold.

    Args:
        model: the model; its weights are zeroed in place.
        sparsity: fraction of the targeted weights to prune, in [0, 1).
        threshold: instead of ``sparsity``: prune every targeted weight whose score is below it
            (``threshold=0.1`` with ``magnitude`` prunes every ``|w| < 0.1``, as the seeds do);
            :meth:`step` returns the sparsity reached. The scope plays no part then.
        criterion: a name from :data:`~secateurs.prune.CRITERIA` or a
            :class:`~secateurs.prune.criteria.Criterion` instance.
        scope: ``"global"`` ranks all targeted weights together; ``"layer"`` prunes every weight
            tensor to the same sparsity.
        targets: weights to prune: parameter or module names (``fnmatch`` patterns) or module
            types. Default: the weights of Linear, Conv1d/2d/3d, RNN/LSTM/GRU and
            MultiheadAttention.
        exclude: weights to leave alone, named the same way.
        per_layer: module (or parameter) name -> its own sparsity; those weights are pruned on
            their own, the rest follows ``scope``. When ``step`` is given a sparsity other than
            ``sparsity`` (a schedule ramping up), these scale in proportion.
        pattern: ``"N:M"``: in every block of M consecutive weights along the input dimension
            at most N are kept; sparsity is then at least ``1 - N/M``.

    ``step(s)`` means "``s`` of the targeted weights are zero", never "prune ``s`` of what is
    left": calling it twice changes nothing, and already pruned weights stay pruned while the
    sparsity rises.

    The words are the same as :func:`~secateurs.prune.structured`'s: ``sparsity`` is the fraction
    removed, ``exclude`` what is left alone, ``scope`` global or per-layer ranking. Only the
    default scope differs (``"global"`` here, ``"layer"`` there; see its docstring for why).

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> pruner = Pruner(model, sparsity=0.75)
    >>> round(pruner.step(), 2)
    0.75
    >>> int((model[0].weight == 0).sum() + (model[2].weight == 0).sum())
    120
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sparsity: float | None = None,
        threshold: float | None = None,
        criterion: str | Criterion = "magnitude",
        scope: str = "global",
        targets: Iterable[str | type[nn.Module]] | None = None,
        exclude: Iterable[str | type[nn.Module]] = (),
        per_layer: Mapping[str, float] | None = None,
        pattern: str | tuple[int, int] | None = None,
    ):
        if sparsity is None and threshold is None:
            check(False, "sparsity", None, "a number in [0, 1), or threshold=... instead")
        check(sparsity is None or threshold is None, "sparsity/threshold", (sparsity, threshold), "one of them, not both")
        self.sparsity: float | None = None if sparsity is None else check_sparsity(sparsity)
        """The target fraction of targeted weights pruned (None when pruning by threshold)."""
        self.threshold: float | None = None if threshold is None else check_threshold(threshold)
        """Weights scoring below it are pruned (None when pruning to a sparsity)."""
        self.scope = check_choice(scope, "scope", SCOPES)
        self.pattern = parse_pattern(pattern)
        self.model = model
        self.targets: list[Target] = find_targets(model, targets, exclude)
        self.per_layer = self._resolve_per_layer(per_layer or {})
        self.criterion = make_criterion(criterion)
        self.criterion.bind(model, self.targets)
        self._masks: list[torch.Tensor] | None = None
        self._pruned = [0] * len(self.targets)
        self._handles: list[RemovableHandle] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._synced: dict[int, int] = {}
        self._version = 0
        self.steps = 0

    def _resolve_per_layer(self, per_layer: Mapping[str, float]) -> dict[int, float]:
        check(isinstance(per_layer, Mapping), "per_layer", per_layer, "a mapping of module name -> sparsity")
        resolved: dict[int, float] = {}
        for key, value in per_layer.items():
            sparsity = check_sparsity(value, f"per_layer[{key!r}]")
            exact = [i for i, t in enumerate(self.targets) if key in (t.name, t.module_name)]
            found = exact or [
                i for i, t in enumerate(self.targets)
                if isinstance(key, str) and (_fnmatch(t.name, key) or _fnmatch(t.module_name, key))
            ]
            if not found:
                names = ", ".join(sorted({t.module_name or t.name for t in self.targets}))
                raise SecateursError(f"per_layer: got {key!r}, which matches no targeted weight; allowed: {names}")
            for i in found:
                resolved.setdefault(i, sparsity)
        return resolved

    # ------------------------------------------------------------------ properties

    @property
    def requires_data(self) -> bool:
        """True when :meth:`score` must run before :meth:`step`."""
        return self.criterion.requires_data

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool keep-mask (``True`` = kept); empty before the first step."""
        if self._masks is None:
            return {}
        return {t.name: m for t, m in zip(self.targets, self._masks, strict=True)}

    @property
    def num_targeted(self) -> int:
        return sum(t.numel for t in self.targets)

    @property
    def current_sparsity(self) -> float:
        """Fraction of the targeted weights pruned now."""
        return sum(self._pruned) / max(self.num_targeted, 1)

    def layer_sparsity(self) -> dict[str, float]:
        """Parameter name -> fraction of it pruned."""
        return {t.name: p / max(t.numel, 1) for t, p in zip(self.targets, self._pruned, strict=True)}

    def _params(self) -> list[torch.Tensor]:
        return [t.param for t in self.targets]

    def _ensure_masks(self) -> list[torch.Tensor]:
        if self._masks is None:
            self._masks = [torch.ones(t.shape, dtype=torch.bool, device=t.param.device) for t in self.targets]
        return self._masks

    # ------------------------------------------------------------------ scoring and pruning

    def score(self, batches: Iterable[Any], loss_fn: LossFn | None = None, *, max_batches: int | None = None) -> int:
        """Feed ``(inputs, targets)`` batches to a data criterion; returns how many it saw.

        Gradients are taken with ``torch.autograd.grad``, so the model's ``.grad`` is untouched;
        the model runs in whatever train/eval mode it is in. Criteria that need no data ignore
        this (``synflow`` reads the input shape from the first batch).
        """
        if max_batches is not None:
            check_int(max_batches, "max_batches", minimum=1)
        return self.criterion.observe(batches, loss_fn, max_batches=max_batches)

    def scores(self) -> dict[str, torch.Tensor]:
        """The criterion's current score of every targeted weight (shaped like it)."""
        return self.criterion.scores(self._ensure_masks())

    def _pools(self, sparsity: float | None) -> list[tuple[list[int], float]]:
        """(target indices ranked together, their sparsity) for a step to ``sparsity``; for a
        threshold step (``None``) only the ``per_layer`` weights, at their own sparsity."""
        scale = sparsity / self.sparsity if sparsity is not None and self.sparsity else 1.0
        rest = [i for i in range(len(self.targets)) if i not in self.per_layer]
        pools: list[tuple[list[int], float]] = []
        if rest and sparsity is not None:
            pools += [(rest, sparsity)] if self.scope == "global" else [([i], sparsity) for i in rest]
        for i, value in self.per_layer.items():
            pools.append(([i], min(value * scale, 1.0 - 1.0 / max(self.targets[i].numel, 1))))
        return pools

    @torch.no_grad()
    def step(self, sparsity: float | None = None) -> float:
        """Prune so that ``sparsity`` (default: the constructor's) of the targeted weights are
        zero, or, for a pruner built with ``threshold`` and no ``sparsity`` given here, every
        targeted weight scoring below the threshold; returns the sparsity reached (exactly the
        target up to rounding, or more where an N:M pattern demands it)."""
        if sparsity is None and self.threshold is not None:
            return self._step(None)
        return self._step(self.sparsity if sparsity is None else check_sparsity(sparsity))

    def _step(self, target: float | None) -> float:
        criterion = self.criterion
        if criterion.requires_data and not criterion.ready():
            extra = " or train with pruner.attach(optimizer)" if criterion.name == "movement" else ""
            raise SecateursError(
                f"criterion: got {criterion.name!r}, which needs data, stepped before any was "
                f"scored; allowed: call pruner.score(batches, loss_fn) before step(){extra}"
            )
        masks = self._ensure_masks()
        pools = []
        for indices, goal in self._pools(target):
            total = sum(self.targets[i].numel for i in indices)
            start = sum(self._pruned[i] for i in indices) / max(total, 1)
            pools.append((indices, goal, start))
        rounds = max(int(criterion.iterations), 1) if target is not None else 1
        try:
            for r in range(1, rounds + 1):
                criterion.prepare(masks)
                try:
                    if target is None:
                        self._prune_below(self._threshold_pool())
                    for indices, goal, start in pools:
                        if goal < start:  # lowering the sparsity: select afresh, in one round
                            if r == 1:
                                for i in indices:
                                    masks[i].fill_(True)
                                self._prune_pool(indices, goal)
                        elif r == rounds:
                            self._prune_pool(indices, goal)
                        else:  # density shrinks geometrically over the rounds (synflow)
                            self._prune_pool(indices, 1.0 - (1.0 - start) * ((1.0 - goal) / (1.0 - start)) ** (r / rounds))
                finally:
                    criterion.release()
        finally:
            criterion.finish()
        self._pruned = [m.numel() - int(m.count_nonzero()) for m in masks]
        self._version += 1
        self.apply_()
        for optimizer in self._optimizers:
            self._sync_optimizer_state(optimizer)
        self.steps += 1
        return self.current_sparsity

    def _threshold_pool(self) -> list[int]:
        return [i for i in range(len(self.targets)) if i not in self.per_layer]

    def _prune_below(self, indices: list[int]) -> None:
        """Prune every weight of ``indices`` scoring below the threshold (N:M blocks first)."""
        assert self._masks is not None and self.threshold is not None
        if self.pattern is not None:
            self._apply_pattern(indices)
        for i in indices:
            flat = self._masks[i].view(-1)
            for start in range(0, flat.numel(), CHUNK):
                stop = min(start + CHUNK, flat.numel())
                flat[start:stop] &= self.criterion.chunk(i, start, stop) >= self.threshold

    def _prune_pool(self, indices: list[int], sparsity: float) -> None:
        """Prune the weights ``indices`` together to ``sparsity`` (N:M blocks first)."""
        assert self._masks is not None
        if self.pattern is not None:
            self._apply_pattern(indices)
        criterion = self.criterion
        prune_lowest_(
            [self._masks[i] for i in indices],
            lambda j, a, b: criterion.chunk(indices[j], a, b),
            int(sparsity * sum(self.targets[i].numel for i in indices) + 0.5),
            keep_pruned=True,
            signed=criterion.signed,
        )

    def _apply_pattern(self, indices: list[int]) -> None:
        assert self.pattern is not None and self._masks is not None
        n, m = self.pattern
        for i in indices:
            mask = self._masks[i]
            scores = self.criterion.chunk(i, 0, mask.numel()).reshape(mask.shape)
            scores = scores.float() if scores.dtype not in (torch.float32, torch.float64) else scores
            scores = scores.masked_fill(~mask, float("-inf"))
            mask &= nm_keep(scores, n, m)

    # ------------------------------------------------------------------ keeping weights at zero

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned weights again (after anything but an attached optimizer wrote them)."""
        if self._masks is not None:
            apply_masks_(self._params(), self._masks)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights, so a gradient norm ignores them.

        Attached optimizers do this before each step, and an attached
        :class:`~secateurs.clip.ClippedOptimizer` before its rule clips. Call it yourself only
        when clipping some other way (e.g. ``torch.nn.utils.clip_grad_norm_``) before the step.
        """
        if self._masks is not None:
            mask_grads_(self._params(), self._masks)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep pruned weights exactly zero through ``optimizer``'s steps.

        Before each step the gradients, momentum buffers and Adam/RMSprop moments of pruned
        weights are zeroed (and the movement criterion accumulates ``-w * g``); after it the
        pruned weights are zeroed again, so even optimizers that mix coordinates cannot revive
        them. Hooks live on the optimizer; the model stays plain.

        Attach the *wrapped* optimizer when clipping with :func:`secateurs.clip.wrap`: a
        pre-clip hook then zeroes the pruned gradients before the rule computes its norm (the
        step hooks run on the inner optimizer, after the clipping). Attaching both the wrapper
        and its inner optimizer registers the step hooks once. Any optimizer wrapper offering
        the same public protocol (``register_pre_clip_hook(hook)`` and the inner optimizer as
        ``.optimizer``) is treated the same way.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SecateursError(f"optimizer: got {type(optimizer).__name__}; allowed: a torch.optim.Optimizer", field="optimizer")
        if any(o is optimizer for o in self._optimizers):
            return
        inner = _inner(optimizer)
        if not any(_inner(o) is inner for o in self._optimizers):
            self._handles.append(optimizer.register_step_pre_hook(_BeforeStep(self)))
            self._handles.append(optimizer.register_step_post_hook(_AfterStep(self)))
        pre_clip = getattr(optimizer, "register_pre_clip_hook", None)
        if callable(pre_clip):
            self._handles.append(pre_clip(_BeforeClip(self)))
        self._optimizers.append(optimizer)
        self._sync_optimizer_state(optimizer)

    def _sync_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # keyed by the inner optimizer: the step hooks receive it, the wrapper shares its state
        key = id(_inner(optimizer))
        if self._masks is not None and self._synced.get(key) != self._version:
            mask_optimizer_state_(optimizer, self._params(), self._masks)
        self._synced[key] = self._version

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        on_step = getattr(self.criterion, "on_optimizer_step", None)
        if on_step is not None:
            on_step()
        self.mask_grads_()
        self._sync_optimizer_state(optimizer)

    def finalize(self) -> nn.Module:
        """Bake the zeros in and remove every hook; returns the model. The masks stay readable."""
        self.apply_()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizers.clear()
        self._synced.clear()
        return self.model

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Masks, criterion state (e.g. movement scores) and sparsity; tensors and JSON types only."""
        return {
            "version": _STATE_VERSION,
            "sparsity": self.sparsity,
            "current_sparsity": self.current_sparsity,
            "steps": self.steps,
            "masks": self.masks,
            "criterion": self.criterion.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and criterion state and re-zero the pruned weights."""
        if not isinstance(state, Mapping) or "masks" not in state or "criterion" not in state:
            raise SecateursError("pruner state: got a mapping without 'masks' and 'criterion'; allowed: Pruner.state_dict()")
        saved = state["masks"]
        names = [t.name for t in self.targets]
        if saved:
            if sorted(saved) != sorted(names):
                raise SecateursError(f"pruner state masks: got {sorted(saved)}; allowed: {sorted(names)}")
            masks = self._ensure_masks()
            for target, mask in zip(self.targets, masks, strict=True):
                value = saved[target.name]
                if tuple(value.shape) != target.shape or value.dtype != torch.bool:
                    raise SecateursError(
                        f"pruner state masks[{target.name!r}]: got {value.dtype} {tuple(value.shape)}; "
                        f"allowed: torch.bool {target.shape}"
                    )
                mask.copy_(value)
            self._pruned = [m.numel() - int(m.count_nonzero()) for m in masks]
        else:
            self._masks = None
            self._pruned = [0] * len(self.targets)
        self.criterion.load_state_dict(dict(state["criterion"]))
        self.steps = int(state.get("steps", 0))
        self._version += 1
        self.apply_()
        for optimizer in self._optimizers:
            self._sync_optimizer_state(optimizer)

    def __repr__(self) -> str:
        goal = f"threshold={self.threshold}" if self.sparsity is None else f"sparsity={self.sparsity}"
        return (
            f"Pruner({goal}, criterion={self.criterion!r}, scope={self.scope!r}, "
            f"targets={len(self.targets)} weights / {self.num_targeted} params, "
            f"pattern={self.pattern}, current_sparsity={self.current_sparsity:.4f})"
        )


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state and runs the step hooks: the wrapped one, if any
    (a wrapper with a pre-clip hook holds it as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    if callable(getattr(optimizer, "register_pre_clip_hook", None)) and isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer


def _fnmatch(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)
