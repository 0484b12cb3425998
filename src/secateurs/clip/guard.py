"""StepGuard: undo an optimizer step under a device-side flag, without reading the flag.

A GPU cannot branch on a value it has not copied to the host, so "skip the step if the
gradients are non-finite" is done the way optax's ``apply_if_finite`` does it: take the step,
then select between the new and the saved values with ``torch.where(ok, new, saved)``.
Multiplying by a 0/1 mask would not do: ``NaN * 0`` is NaN. The guard therefore keeps one
copy of the parameters with a gradient and of their optimizer state tensors (buffers reused
from step to step), so "skip" costs one extra read-write of that memory per step.

Only changes the flag cannot express as a select force a host read of the flag: optimizer
state created or removed by the step, or a non-tensor value (a Python number) that changed in
the state or in a parameter group (some optimizers count steps in the group). With torch's built-in optimizers that happens on the step that creates the state
(normally the first) and never again. A state tensor kept on another device than the flag
(Adam's CPU ``step`` counter for CUDA parameters unless ``capturable=True`` or ``fused=True``)
is restored after copying the flag to that device, which is a sync too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secateurs.clip._tensors import is_dtensor, local

__all__ = ["StepGuard"]

_MISSING = object()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, (bool, int, float, str, type(None))) and type(a) is type(b):
        return a == b
    return False


@dataclass
class _Capture:
    params: list[Tensor]
    tensors: list[Tensor]  # params first, then state tensors, as captured
    slots: list[tuple[Tensor, Any]]  # (param, key) of each state tensor
    before: dict[Tensor, dict[Any, Any] | None]  # shallow copy of each param's state dict
    groups: list[dict[str, Any]]  # shallow copy of each param group's options
    buffers: list[Tensor] = field(default_factory=list)


class StepGuard:
    """Saves what an optimizer step may change and restores it where a flag says so."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._signature: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    @torch.no_grad()
    def capture(self, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> _Capture:
        """Copy ``params`` and their optimizer state tensors into the guard's buffers."""
        tensors = list(params)
        slots: list[tuple[Tensor, Any]] = []
        before: dict[Tensor, dict[Any, Any] | None] = {}
        state = optimizer.state
        for p in params:
            if p in state:  # `state` is a defaultdict: test, never index, absent params
                entry = dict(state[p])
                before[p] = entry
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        tensors.append(value)
                        slots.append((p, key))
            else:
                before[p] = None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        cap = _Capture(list(params), tensors, slots, before, groups)
        sources = local(tensors)
        cap.buffers = self._buffers_for(sources)
        _copy_(cap.buffers, sources)
        return cap

    def _buffers_for(self, tensors: list[Tensor]) -> list[Tensor]:
        signature = [(t.shape, t.dtype, t.device) for t in tensors]
        if signature != self._signature:
            self._buffers = [torch.empty_like(t) for t in tensors]
            self._signature = signature
        return self._buffers

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, cap: _Capture, ok: Tensor) -> None:
        """Keep the stepped values where ``ok`` is True, the captured ones elsewhere."""
        flags: dict[torch.device, Tensor] = {ok.device: ok}

        def flag(device: torch.device) -> Tensor:
            if device not in flags:
                flags[device] = ok.to(device)
            return flags[device]

        n = len(cap.params)
        for t, saved in zip(local(cap.params), cap.buffers[:n], strict=True):
            torch.where(flag(t.device), t, saved, out=t)

        state = optimizer.state
        reshaped = False
        for (p, key), orig, saved in zip(cap.slots, cap.tensors[n:], cap.buffers[n:], strict=True):
            now = state[p].get(key, _MISSING) if p in state else _MISSING
            if now is orig:
                target = local([orig])[0]
                torch.where(flag(target.device), target, saved, out=target)
            elif isinstance(now, Tensor) and not is_dtensor(now) and now.shape == saved.shape:
                state[p][key] = torch.where(flag(now.device), now, saved.to(now.dtype))
            else:
                reshaped = True

        # Only a host-side decision can delete new entries or restore Python values, so the
        # flag is read only when the step changed the state's structure.
        if (reshaped or self._structure_changed(optimizer, cap)) and not bool(ok):
            self._restore_structure(optimizer, cap)

    @staticmethod
    def _structure_changed(optimizer: torch.optim.Optimizer, cap: _Capture) -> bool:
        for group, saved in zip(optimizer.param_groups, cap.groups, strict=True):
            # some optimizers keep a step count in the group (not in the state)
            if group.keys() - {"params"} != saved.keys():
                return True
            if not all(_same(group[k], v) for k, v in saved.items()):
                return True
        state = optimizer.state
        for p, entry in cap.before.items():
            if entry is None:
                if p in state and len(state[p]) > 0:
                    return True
                continue
            now = state.get(p, {})
            if now.keys() != entry.keys():
                return True
            for key, value in entry.items():
                if not isinstance(value, Tensor) and not _same(now[key], value):
                    return True
        return False

    @staticmethod
    def _restore_structure(optimizer: torch.optim.Optimizer, cap: _Capture) -> None:
        for group, saved in zip(optimizer.param_groups, cap.groups, strict=True):
            params = group["params"]
            group.clear()
            group.update(saved)
            group["params"] = params
        state = optimizer.state
        saved = dict(zip(cap.slots, cap.buffers[len(cap.params) :], strict=True))
        for p, entry in cap.before.items():
            if entry is None:
                state.pop(p, None)
                continue
            restored = dict(entry)
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    local([value])[0].copy_(saved[(p, key)])
            state[p] = restored


def _copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        ds, ss = by_device.setdefault(s.device, ([], []))
        ds.append(d)
        ss.append(s)
    for device, (ds, ss) in by_device.items():
        if device.type in ("cpu", "cuda"):
            torch._foreach_copy_(ds, ss)
        else:
            for d, s in zip(ds, ss, strict=True):
                d.copy_(s)
