"""Blocks, and calibrating a model one block at a time on the outputs of the blocks before it.

A *block* is a child of a repeated container: a ``ModuleList`` or ``Sequential`` of at least two
modules of one class, each holding targeted weights (a Hugging Face encoder's ``layer`` list, a
decoder LM's ``layers``, a ResNet stage's residual blocks). No per-architecture code: the
outermost such containers are taken. Every targeted weight outside a block is a unit of its own.

Units are calibrated in the order the model runs them (seen on one probe batch). A block whose
input is the output of the block just before it (checked on the probe batch) is run directly on
the stored, already-pruned outputs of that block; any other unit gets its inputs from a forward
of the whole (partly pruned) model, stopped as soon as the unit has run. Only one block's inputs
are held at a time, on ``offload`` when given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.inputs import forward, tensors_of, to_device
from secateurs.prune.calibration.stats import InputStats, Recorder
from secateurs.prune.masks import PRUNABLE_MODULES, Target

__all__ = ["Batch", "Unit", "calibrate", "find_blocks", "make_batches", "plan_units"]


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needed has run."""


@dataclass
class Batch:
    """One calibration batch: the model's inputs, and which positions are not padding."""

    inputs: Any
    valid: torch.Tensor | None = None


@dataclass
class Unit:
    """What is calibrated and pruned at once: one block, or one module outside every block."""

    name: str
    targets: list[Target]
    block: nn.Module | None = None
    container: str | None = None
    index: int = -1
    chained: bool = False
    """True when its inputs are the outputs of the unit before it (a block after its sibling)."""
    seen: bool = True
    """False when the probe batch never reached it."""


def make_batches(calibration: Iterable[Any], offload: torch.device | str | None = None) -> list[Batch]:
    """The calibration batches as :class:`Batch` es: a tensor, a tuple of positional inputs or a
    mapping of keyword inputs (a tokenizer's output: its ``attention_mask`` marks padding), or an
    ``(inputs, targets)`` pair whose targets are dropped."""
    if isinstance(calibration, torch.Tensor | Mapping):
        raise SecateursError(
            f"calibration: got a single {type(calibration).__name__}; allowed: an iterable of batches "
            "(e.g. a list of tensors, of tokenizer outputs, or a DataLoader)"
        )
    out = []
    for item in calibration:
        inputs = item
        if _is_labelled(item):
            inputs = item[0]
        elif not isinstance(item, torch.Tensor | Mapping | tuple | list):
            raise SecateursError(
                f"calibration: got a batch of type {type(item).__name__}; allowed: tensors, tuples of "
                "positional inputs, mappings of keyword inputs, or (inputs, labels) pairs"
            )
        valid = None
        if isinstance(inputs, Mapping):
            mask = inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                valid = mask.to(torch.bool)
        if offload is not None:
            inputs = to_device(inputs, offload)
            valid = None if valid is None else valid.to(offload)
        out.append(Batch(inputs, valid))
    if not out:
        raise SecateursError("calibration: got no batch; allowed: at least one batch of model inputs")
    return out


def _is_labelled(item: Any) -> bool:
    """An ``(inputs, labels)`` pair: a tensor or mapping, then a 0-/1-D integer tensor."""
    if not (isinstance(item, tuple | list) and len(item) == 2):
        return False
    inputs, labels = item
    return (
        isinstance(inputs, torch.Tensor | Mapping) and isinstance(labels, torch.Tensor)
        and not labels.is_floating_point() and labels.dim() <= 1
    )


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def find_blocks(model: nn.Module, targets: Sequence[Target]) -> list[tuple[str, int, nn.Module]]:
    """``(container name, index, block)`` for every block, containers outermost first."""
    holders = {id(t.module) for t in targets}
    containers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        kids = list(module)
        if len({type(k) for k in kids}) != 1 or isinstance(kids[0], PRUNABLE_MODULES):
            continue
        if all(any(id(m) in holders for m in kid.modules()) for kid in kids):
            containers.append((name, module))
    outer = [
        (name, c) for name, c in containers
        if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in containers)
    ]
    return [(name, i, kid) for name, c in outer for i, kid in enumerate(c)]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_tensor(output: Any) -> torch.Tensor | None:
    found = tensors_of(output)
    return found[0] if found else None


def plan_units(model: nn.Module, targets: Sequence[Target], probe: Batch) -> list[Unit]:
    """The units in the order one forward of ``probe`` runs them, chaining checked on it."""
    blocks = find_blocks(model, targets)
    block_of: dict[int, int] = {}
    for b, (_, _, block) in enumerate(blocks):
        for m in block.modules():
            block_of.setdefault(id(m), b)
    order: list[tuple[str, int]] = []
    hidden_in: dict[int, torch.Tensor | None] = {}
    first_out: dict[int, torch.Tensor | None] = {}
    handles = []

    def block_pre(b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if b not in hidden_in:
                hidden_in[b] = _hidden(args, kwargs)
                order.append(("block", b))
        return hook

    def block_post(b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            first_out.setdefault(b, _first_tensor(output))
        return hook

    def target_pre(t: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if ("target", t) not in order:
                order.append(("target", t))
        return hook

    try:
        for b, (_, _, block) in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_pre(b), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post(b), with_kwargs=True))
        for t, target in enumerate(targets):
            if id(target.module) not in block_of:
                handles.append(target.module.register_forward_pre_hook(target_pre(t)))
        with torch.no_grad():
            forward(model, to_device(probe.inputs, _device_of(model)))
    finally:
        for h in handles:
            h.remove()
    in_block: dict[int, list[Target]] = {}
    for target in targets:
        b = block_of.get(id(target.module))
        if b is not None:
            in_block.setdefault(b, []).append(target)
    units: list[Unit] = []
    for kind, i in order:
        if kind == "block":
            container, index, block = blocks[i]
            name = f"{container}.{index}" if container else str(index)
            prev = units[-1] if units else None
            chained = (
                prev is not None and prev.container == container and prev.index == index - 1
                and _same(hidden_in.get(i), first_out.get(i - 1))
            )
            units.append(Unit(name, in_block.get(i, []), block, container, index, chained))
        else:
            units.append(Unit(targets[i].module_name, [targets[i]]))
    seen_blocks = {i for kind, i in order if kind == "block"}
    seen_targets = {i for kind, i in order if kind == "target"}
    for i, (container, index, block) in enumerate(blocks):
        if i not in seen_blocks:
            units.append(Unit(f"{container}.{index}", in_block.get(i, []), block, container, index, seen=False))
    for t, target in enumerate(targets):
        if id(target.module) not in block_of and t not in seen_targets:
            units.append(Unit(target.module_name, [target], seen=False))
    return units


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return False
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))


@dataclass
class _Inputs:
    """A block's stored inputs, one ``(args, kwargs)`` per batch."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)


def _capture(model: nn.Module, block: nn.Module, batches: Sequence[Batch], offload: torch.device | str | None) -> _Inputs:
    stored = _Inputs()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        keep_args, keep_kwargs = args, kwargs
        if offload is not None:
            keep_args, keep_kwargs = to_device(args, offload), to_device(kwargs, offload)
        stored.calls.append((tuple(keep_args), dict(keep_kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = _device_of(model)
    try:
        for batch in batches:
            try:
                forward(model, to_device(batch.inputs, device))
            except _Stop:
                continue
            raise SecateursError(
                "calibration: got a batch that never reached a block the first batch ran through; "
                "allowed: batches of the same kind"
            )
    finally:
        handle.remove()
    return stored


def _run_block(block: nn.Module, inputs: _Inputs, batches: Sequence[Batch], recorder: Recorder | None,
               keep_outputs: bool, offload: torch.device | str | None) -> _Inputs:
    device = _device_of(block)
    outputs = _Inputs()
    for (args, kwargs), batch in zip(inputs.calls, batches, strict=True):
        if recorder is not None:
            recorder.valid = batch.valid
        out = block(*to_device(args, device), **to_device(kwargs, device))
        if keep_outputs:
            hidden = _first_tensor(out)
            assert hidden is not None
            hidden = hidden.detach()
            if offload is not None:
                hidden = hidden.to(offload)
            outputs.calls.append(_with_hidden(args, kwargs, hidden))
    return outputs


def _run_until(model: nn.Module, module: nn.Module, batches: Sequence[Batch], recorder: Recorder) -> None:
    def stop(mod: nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handle = module.register_forward_hook(stop)
    device = _device_of(model)
    try:
        for batch in batches:
            recorder.valid = batch.valid
            with contextlib.suppress(_Stop):
                forward(model, to_device(batch.inputs, device))
    finally:
        handle.remove()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Sequence[Batch],
    units: Sequence[Unit],
    prune_unit: Callable[[Unit, dict[str, InputStats]], None],
    *,
    hessian: bool = True,
    absolute: bool = False,
    offload: torch.device | str | None = None,
    on_unit: Callable[[Unit], None] | None = None,
) -> None:
    """Calibrate and prune ``units`` in order, each on the outputs of the pruned ones before it.

    ``prune_unit(unit, stats)`` prunes the unit's targets from their input statistics
    (parameter name -> :class:`InputStats`; a target no batch reached is missing).
    """
    carry: _Inputs | None = None
    for pos, unit in enumerate(units):
        recorder = Recorder(unit.targets, hessian=hessian, absolute=absolute)
        if unit.block is not None and unit.seen:
            if carry is None or not unit.chained:
                carry = _capture(model, unit.block, batches, offload)
            with recorder.record():
                _run_block(unit.block, carry, batches, recorder, False, offload)
            prune_unit(unit, recorder.stats)
            following = units[pos + 1] if pos + 1 < len(units) else None
            if following is not None and following.chained and following.seen:
                carry = _run_block(unit.block, carry, batches, None, True, offload)
            else:
                carry = None
        else:
            carry = None
            if unit.seen and unit.targets:
                with recorder.record():
                    _run_until(model, unit.targets[0].module, batches, recorder)
            prune_unit(unit, recorder.stats)
        if on_unit is not None:
            on_unit(unit)
