"""StepGuard: undo an optimizer step under a device-side flag, without reading the flag.

A GPU cannot branch on a value it has not copied to the host, so "skip the step if the
gradients are non-finite" is done the way optax's ``apply_if_finite`` does it: take the step,
then select between the new and the saved values with ``torch.where(ok, new, saved)``.
Multiplying by a 0/1 mask would not do: ``NaN * 0`` is NaN. The guard therefore keeps one
copy of the parameters with a gradient and of their optimizer state tensors (buffers reused
from step to step), so "skip" costs one extra read-write of that memory per step.

Some changes a select cannot express: optimizer state created or removed by the step (torch's
optimizers create theirs on the first step), a non-tensor value (a Python number) changed in
the state or in a parameter group, and a state tensor kept on the CPU beside a flag on another
device (Adam's ``step`` counters for CUDA parameters unless ``capturable=True`` or
``fused=True``). For those the guard never reads the flag on the step itself: it starts a
non-blocking copy of the flag to the host and undoes them, if the flag says so, when the wrapper
next needs the state right (the next ``step()``, ``state_dict()``, a copy or pickle): by then
the copy has long arrived (see :meth:`StepGuard.settle`). A ``meta`` flag has no value to copy;
there the step's changes are kept.
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


@dataclass
class _Undo:
    """What a step changed that no select can undo, kept until the flag is on the host."""

    flag: Tensor  # the host copy of the finite flag (filled by a non-blocking copy)
    event: Any  # a CUDA event recorded after that copy, or None
    groups: list[tuple[dict[str, Any], str, Any, Any]]  # (group, key, before or _MISSING, after)
    states: list[tuple[Tensor, dict[Any, Any] | None, dict[Any, Any] | None]]  # (param, before,
    # after); after None: recorded by a compiled step, the param had no state before it
    copies: list[tuple[Tensor, Tensor]]  # (tensor, its captured value) to copy back on a skip;
    # the captured values are the guard's buffers, which the next capture reuses: it settles first

    def skipped(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # waits for the copy only, issued a step ago
        return not bool(self.flag)


class StepGuard:
    """Saves what an optimizer step may change and restores it where a flag says so."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._signature: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._undo: _Undo | None = None

    @property
    def pending(self) -> bool:
        """Whether the last step's structural changes await its flag (see :meth:`settle`)."""
        return self._undo is not None

    def settle(self, optimizer: torch.optim.Optimizer, *, groups_only: bool = False) -> None:
        """Undo the structural changes of the last step if its flag says it was skipped.

        Reads the host copy of that flag (started without a sync when the step ran; on a GPU
        this waits at most for that copy, not for later work). Call it before anything reads
        or changes the optimizer's state structure; a no-op when nothing is pending, and with
        ``groups_only`` unless the step changed a value in a parameter group.
        """
        if self._undo is None or (groups_only and not self._undo.groups):
            return
        undo, self._undo = self._undo, None
        if undo is None or not undo.skipped():
            return
        for group, key, before, after in undo.groups:
            if key in group and _same(group[key], after):  # unless changed since (a scheduler)
                if before is _MISSING:
                    del group[key]
                else:
                    group[key] = before
        state = optimizer.state
        for p, before, after in undo.states:
            if after is None:  # recorded by a compiled step, which cannot see what it created
                state.pop(p, None)
                continue
            now = state.get(p)
            if now is None or now.keys() != after.keys() or any(now[k] is not v for k, v in after.items()):
                continue  # changed since the step: leave it
            if before is None:
                del state[p]
            else:
                state[p] = before
        for tensor, saved in undo.copies:
            tensor.copy_(saved)

    def discard(self) -> None:
        """Forget pending changes (the optimizer's state was replaced, e.g. by a load)."""
        self._undo = None

    @torch.no_grad()
    def capture(self, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> _Capture:
        """Copy ``params`` and their optimizer state tensors into the guard's buffers."""
        self.settle(optimizer)  # the buffers below are the ones a pending undo copies from
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
        """Keep the stepped values where ``ok`` is True, the captured ones elsewhere.

        Never reads ``ok`` on the host: what a select cannot restore is left for
        :meth:`settle`, with a non-blocking copy of ``ok`` to read then.
        """
        flags: dict[torch.device, Tensor] = {ok.device: ok}
        copies: list[tuple[Tensor, Tensor]] = []
        host_only = ok.device.type != "cpu"  # a CPU select would need ok on the host now

        def flag(device: torch.device) -> Tensor:
            if device not in flags:
                flags[device] = ok.to(device, non_blocking=True)
            return flags[device]

        def select(target: Tensor, saved: Tensor) -> None:
            if host_only and target.device.type == "cpu":
                copies.append((target, saved))
            else:
                torch.where(flag(target.device), target, saved, out=target)

        n = len(cap.params)
        for t, saved in zip(local(cap.params), cap.buffers[:n], strict=True):
            select(t, saved)

        state = optimizer.state
        reshaped: set[Tensor] = set()
        for (p, key), orig, saved in zip(cap.slots, cap.tensors[n:], cap.buffers[n:], strict=True):
            now = state[p].get(key, _MISSING) if p in state else _MISSING
            if now is orig:
                select(local([orig])[0], saved)
            elif (
                isinstance(now, Tensor)
                and not is_dtensor(now)
                and now.shape == saved.shape
                and now.device == saved.device
                and not (host_only and now.device.type == "cpu")
            ):
                state[p][key] = torch.where(flag(now.device), now, saved.to(now.dtype))
            else:
                reshaped.add(p)
        for (p, _), orig, saved in zip(cap.slots, cap.tensors[n:], cap.buffers[n:], strict=True):
            if p in reshaped:  # its captured tensors get their values back with the structure
                copies.append((local([orig])[0], saved))

        groups = self._changed_groups(optimizer, cap)
        states = self._changed_states(optimizer, cap, reshaped)
        if (groups or states or copies) and ok.device.type != "meta":  # meta: no value to read
            self._undo = _Undo(*_host_flag(ok), groups, states, copies)

    @staticmethod
    def _changed_groups(
        optimizer: torch.optim.Optimizer, cap: _Capture
    ) -> list[tuple[dict[str, Any], str, Any, Any]]:
        # some optimizers keep a step count in the group (not in the state)
        changed = []
        for group, saved in zip(optimizer.param_groups, cap.groups, strict=True):
            for key in (group.keys() | saved.keys()) - {"params"}:
                before, after = saved.get(key, _MISSING), group.get(key, _MISSING)
                if not _same(before, after):
                    changed.append((group, key, before, after))
        return changed

    @staticmethod
    def _changed_states(
        optimizer: torch.optim.Optimizer, cap: _Capture, reshaped: set[Tensor]
    ) -> list[tuple[Tensor, dict[Any, Any] | None, dict[Any, Any] | None]]:
        """(param, its state before, after) for each param whose state changed structure."""
        state = optimizer.state
        changed = []
        real: dict[Tensor, bool] = {}
        if torch.compiler.is_compiling():
            # Dynamo creates a torch optimizer's state while tracing (its _init_group runs for
            # real), out of the traced view of `state`: ask the real optimizer what has state
            flat = [p for group in optimizer.param_groups for p in group["params"]]
            real = dict(zip(flat, _with_state(optimizer), strict=True))
        for p, entry in cap.before.items():
            now = state.get(p, {})  # `state` is a defaultdict: never index absent params
            if entry is None and real:
                if now or real.get(p, False):  # created by this compiled step: drop on a skip
                    changed.append((p, None, None))
                continue
            if entry is None:
                if now:
                    changed.append((p, None, dict(now)))
                continue
            if p in reshaped or now.keys() != entry.keys() or any(
                not isinstance(v, Tensor) and not _same(now[k], v) for k, v in entry.items()
            ):
                changed.append((p, entry, dict(now)))
        return changed


def _with_state(optimizer: torch.optim.Optimizer) -> tuple[bool, ...]:
    """Whether each parameter (in ``param_groups`` order) has optimizer state; called by
    Dynamo with the real optimizer while it traces (see ``wrap._settle_while_tracing``)."""
    state = optimizer.state
    return tuple(p in state for group in optimizer.param_groups for p in group["params"])


_with_state._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _host_flag(ok: Tensor) -> tuple[Tensor, Any]:
    """A host copy of ``ok`` started without waiting for it, and an event marking its arrival."""
    if ok.device.type != "cuda" or torch.compiler.is_compiling():
        # the CPU; other devices are read (a sync) when settled, and so is a compiled step's
        # flag: it is settled while the next step is traced (a recompile), see wrap.py
        return ok, None
    host = ok.to("cpu", non_blocking=True)  # into pinned memory: asynchronous
    event = torch.cuda.Event()
    event.record()
    return host, event


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
