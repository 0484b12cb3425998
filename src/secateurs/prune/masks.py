"""Which weights are prunable, and the bool masks that keep pruned weights exactly zero.

A mask is a ``torch.bool`` tensor shaped like its weight, ``True`` where the weight is kept (the
``torch.nn.utils.prune`` convention). Masks are applied in place with ``torch.where``, so the
model keeps its own ``nn.Parameter`` objects, its state_dict keys and its deepcopy/pickle
behaviour: nothing is wrapped, reparametrised or hooked on the model itself. Pruned weights are
kept at zero through training by hooks on the optimizer (see ``Pruner.attach``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import SecateursError

try:  # torch.distributed can be missing from custom builds
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    _DTensor = None

__all__ = [
    "PRUNABLE_MODULES",
    "Target",
    "apply_masks_",
    "find_targets",
    "mask_grads_",
    "mask_optimizer_state_",
    "prunable_weights",
]

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.RNNBase,
    nn.MultiheadAttention,
)
"""Module types whose weights are pruned by default (biases and norms never are)."""

_PRUNABLE_NAMES = "Linear, Conv1d/2d/3d, RNN/LSTM/GRU, MultiheadAttention"


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight: ``module.<attr>``, known in the model as ``name``."""

    name: str
    module_name: str
    attr: str
    module: nn.Module

    @property
    def param(self) -> torch.Tensor:
        """The parameter itself (looked up each time, so ``model.to(...)`` is always seen)."""
        return getattr(self.module, self.attr)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def prunable_weights(module: nn.Module) -> list[str]:
    """Attribute names of the weights of ``module`` that are pruned by default.

    >>> prunable_weights(nn.LSTM(4, 8))
    ['weight_ih_l0', 'weight_hh_l0']
    >>> prunable_weights(nn.MultiheadAttention(8, 2))  # out_proj is a Linear of its own
    ['in_proj_weight']
    """
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [n for n in names if isinstance(getattr(module, n, None), nn.Parameter)]
    if isinstance(module, PRUNABLE_MODULES) and isinstance(getattr(module, "weight", None), nn.Parameter):
        return ["weight"]
    return []


def _matches(pattern: str, *names: str) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for name in names)


def _candidates(model: nn.Module) -> list[Target]:
    """Every floating-point parameter of the model once (shared parameters under their first name)."""
    seen: set[int] = set()
    out: list[Target] = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point():
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            out.append(Target(name, module_name, attr, module))
    return out


def _selects(item: str | type[nn.Module], target: Target, module_names: set[str]) -> bool:
    """Whether a ``targets``/``exclude`` entry names this weight.

    A type names the weights of its modules (the default ones of a prunable type, else
    ``weight``). A string that matches module names names their weights the same way when it is
    a module's exact name; as an ``fnmatch`` pattern (``"features.*"``) it reaches only the
    default weights of prunable layers (Linear, Conv, RNN, attention), never a normalisation
    gain or an embedding. Any other string is matched against parameter names: an exact name
    (``"classifier.1.bias"``) names that parameter, whatever it is; a pattern (``"*.weight"``)
    again only the default weights of prunable layers.
    """
    if isinstance(item, type):
        return isinstance(target.module, item) and target.attr in _weights_of(target.module)
    if any(_matches(item, name) for name in module_names):
        if item == target.module_name:
            return target.attr in _weights_of(target.module)
        return fnmatch.fnmatchcase(target.module_name, item) and target.attr in prunable_weights(target.module)
    if item == target.name:
        return True
    return fnmatch.fnmatchcase(target.name, item) and target.attr in prunable_weights(target.module)


def _weights_of(module: nn.Module) -> list[str]:
    names = prunable_weights(module)
    if names:
        return names
    return ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []


def _check_items(field: str, items: Iterable[str | type[nn.Module]]) -> list[str | type[nn.Module]]:
    if isinstance(items, str | type):
        items = [items]
    out = list(items)
    for item in out:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise SecateursError(
                f"{field}: got {item!r}; allowed: parameter or module names (fnmatch patterns) "
                "or nn.Module subclasses"
            )
    return out


def find_targets(
    model: nn.Module,
    targets: Iterable[str | type[nn.Module]] | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
) -> list[Target]:
    """The weights to prune, in model order.

    ``targets=None`` takes the weights of every Linear, Conv1d/2d/3d, RNN/LSTM/GRU and
    MultiheadAttention. Otherwise each entry is a module name (its weights), a parameter name
    (``fnmatch`` patterns allowed for both, e.g. ``"features.*"``, ``"encoder.layer.*"``) or a
    module type. A pattern reaches only those default weights of prunable layers: biases,
    normalisation gains and embeddings are pruned only when named exactly
    (``"classifier.1.bias"``) or by type. ``exclude`` removes weights the same way. Every entry
    must match something.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [t.name for t in find_targets(model, exclude=["2"])]
    ['0.weight']
    """
    if not isinstance(model, nn.Module):
        raise SecateursError(f"model: got {type(model).__name__}; allowed: a torch.nn.Module")
    candidates = _candidates(model)
    modules = {t.module_name for t in candidates if t.module_name and _weights_of(t.module)}

    def selects(item: str | type[nn.Module], target: Target) -> bool:
        return _selects(item, target, modules)

    if targets is None:
        chosen = [t for t in candidates if t.attr in prunable_weights(t.module)]
    else:
        items = _check_items("targets", targets)
        for item in items:
            if not any(selects(item, t) for t in candidates):
                reached = isinstance(item, str) and any(_matches(item, t.name) or _matches(item, t.module_name) for t in candidates)
                why = ("it matches only parameters a pattern never reaches (biases, normalisation gains, "
                       "embeddings: name each by its full name to prune it)") if reached else "it matches no parameter of the model"
                raise SecateursError(
                    f"targets: got {item!r}; {why}; allowed: "
                    "parameter or module names (fnmatch patterns) or module types present in it"
                )
        chosen = [t for t in candidates if any(selects(item, t) for item in items)]
    excluded = _check_items("exclude", exclude)
    for item in excluded:
        if not any(selects(item, t) for t in chosen):
            raise SecateursError(
                f"exclude: got {item!r}; it matches no prunable weight; allowed: names of "
                f"targeted weights or modules, e.g. {', '.join(t.module_name or t.name for t in chosen[:3])}"
            )
    chosen = [t for t in chosen if not any(selects(item, t) for item in excluded)]
    if not chosen:
        raise SecateursError(
            f"model: got {type(model).__name__} with no prunable weight left; allowed: a model "
            f"with at least one weight of {_PRUNABLE_NAMES} (or name them in targets)"
        )
    return chosen


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


def _mask_on(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask if mask.device == like.device else mask.to(like.device)


def _local_pair(mask: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, like)`` as plain tensors to combine in place.

    Masks are whole (global shape) on every rank; a DTensor ``like`` (a parameter sharded by
    FSDP2's ``fully_shard``, its gradient or optimizer state) is paired with the slice of the
    mask its local shard holds, cut locally with no communication.
    """
    if _DTensor is None or not isinstance(like, _DTensor):
        return _mask_on(mask, like), like
    local = distribute_tensor(_mask_on(mask, like), like.device_mesh, like.placements, src_data_rank=None)
    return local.to_local(), like.to_local()


@torch.no_grad()
def apply_masks_(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Zero ``params`` in place where ``masks`` is False (the zeros are +0.0, never -0.0).

    >>> w = torch.tensor([-1.0, 2.0, -3.0])
    >>> apply_masks_([w], [torch.tensor([False, True, False])]); w
    tensor([0., 2., 0.])
    """
    for param, mask in zip(params, masks, strict=True):
        data = param.data if isinstance(param, nn.Parameter) else param
        mask, data = _local_pair(mask, data)
        torch.where(mask, data, _zero(data), out=data)


@torch.no_grad()
def mask_grads_(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Zero the ``.grad`` of ``params`` in place where ``masks`` is False (dense grads only)."""
    for param, mask in zip(params, masks, strict=True):
        grad = param.grad
        if grad is not None and grad.layout == torch.strided and grad.shape == mask.shape:
            mask, grad = _local_pair(mask, grad)
            torch.where(mask, grad, _zero(grad), out=grad)


@torch.no_grad()
def mask_optimizer_state_(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> None:
    """Zero every per-weight state tensor (momentum, Adam moments, ...) where ``masks`` is False.

    With the state and the gradient of a pruned weight at zero, SGD (momentum, weight decay),
    Adam, AdamW and RMSprop all leave it at exactly +0.0, so a weight never drifts back.
    """
    for param, mask in zip(params, masks, strict=True):
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape and value.is_floating_point():
                local_mask, local_value = _local_pair(mask, value)
                torch.where(local_mask, local_value, _zero(local_value), out=local_value)
