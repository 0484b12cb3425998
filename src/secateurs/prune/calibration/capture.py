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

from secateurs._memory import release_freed_memory
from secateurs.errors import SecateursError
from secateurs.inputs import forward, tensors_of, to_device
from secateurs.prune.calibration.stats import InputStats, Recorder, StopForward, supports
from secateurs.prune.masks import PRUNABLE_MODULES, Target

__all__ = ["Batch", "Unit", "calibrate", "find_blocks", "make_batches", "plan_units"]


_Stop = StopForward


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


@dataclass
class _Dense:
    """The dense twin of the block being pruned: a copy taken before any of its groups was
    pruned, its inputs in the dense model, and its modules by the id of the pruned original."""

    block: nn.Module
    inputs: _Inputs
    twin: dict[int, nn.Module]

    @classmethod
    def of(cls, block: nn.Module, inputs: _Inputs) -> _Dense:
        import copy

        saved = block._forward_pre_hooks, block._forward_hooks  # the stream's load / unload hooks stay behind
        block._forward_pre_hooks, block._forward_hooks = type(saved[0])(), type(saved[1])()
        try:
            twin = copy.deepcopy(block)
        finally:
            block._forward_pre_hooks, block._forward_hooks = saved
        pairs = dict(zip((id(m) for m in block.modules()), twin.modules(), strict=True))
        return cls(twin, inputs, pairs)

    def inputs_of(self, targets: Sequence[Target], call: tuple[tuple, dict]) -> dict[str, torch.Tensor]:
        """One batch through the dense twin: every target's input there, by target name."""
        found: dict[str, torch.Tensor] = {}
        wanted = {t.name for t in targets}
        handles = []

        def grab(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs.get("input")
                if isinstance(x, torch.Tensor) and name not in found:
                    found[name] = x.detach()
                if wanted <= set(found):
                    raise _Stop
            return hook

        for t in targets:
            handles.append(self.twin[id(t.module)].register_forward_pre_hook(grab(t.name), with_kwargs=True))
        device = _device_of(self.block)
        args, kwargs = call
        try:
            with contextlib.suppress(_Stop):
                self.block(*to_device(args, device), **to_device(kwargs, device))
        finally:
            for h in handles:
                h.remove()
        return found


def _run_block(block: nn.Module, inputs: _Inputs, batches: Sequence[Batch], recorder: Recorder | None,
               keep_outputs: bool, offload: torch.device | str | None, dense: _Dense | None = None,
               targets: Sequence[Target] = ()) -> _Inputs:
    device = _device_of(block)
    outputs = _Inputs()
    for i, ((args, kwargs), batch) in enumerate(zip(inputs.calls, batches, strict=True)):
        if recorder is not None:
            recorder.valid = batch.valid
            if dense is not None:
                recorder.dense = dense.inputs_of(targets, dense.inputs.calls[i])
        try:
            out = block(*to_device(args, device), **to_device(kwargs, device))
        except StopForward:
            assert recorder is not None and not keep_outputs
            recorder.freeze()
            continue
        if recorder is not None:
            recorder.freeze()
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
    prune_unit: Callable[[Unit, list[Target], dict[str, InputStats]], None],
    *,
    hessian: bool = True,
    absolute: bool = False,
    offload: torch.device | str | None = None,
    on_unit: Callable[[Unit], None] | None = None,
    load: Callable[[Unit], None] | None = None,
    unload: Callable[[Unit], None] | None = None,
    dense: bool = False,
) -> None:
    """Calibrate and prune ``units`` in order, each on the outputs of the pruned ones before it.

    ``prune_unit(unit, targets, stats)`` prunes ``targets`` (some of the unit's) from their
    input statistics (parameter name -> :class:`InputStats`; a target no batch reached is
    missing). Inside a block the targets are calibrated and pruned a group at a time in the
    order the block runs them (a group: the layers that read one input tensor, such as q, k and
    v), each group on the outputs of the groups pruned before it, so only one group's
    statistics are held at a time. ``load`` / ``unload`` are called around every block (the
    streamed model's weights are read in and written out there).

    With ``dense``, each block also runs as it was before pruning (a copy) on its inputs in the
    dense model, and the statistics add ``X^T X_dense`` (:attr:`InputStats.cross`). The dense
    inputs are known for a block the model reaches before anything is pruned and for the
    blocks chained after it; other units get no cross term.
    """
    carry: _Inputs | None = None
    dense_carry: _Inputs | None = None
    pruned_any = False
    for pos, unit in enumerate(units):
        if unit.block is not None and unit.seen:
            if load is not None:
                load(unit)
            if carry is None or not unit.chained:
                carry = _capture(model, unit.block, batches, offload)
                dense_carry = carry if not pruned_any else None
            twin = _Dense.of(unit.block, dense_carry) if dense and dense_carry is not None else None
            remaining = [t for t in unit.targets if supports(t)]
            while remaining:
                recorder = Recorder(remaining, hessian=hessian, absolute=absolute, one_group=True)
                with recorder.record():
                    _run_block(unit.block, carry, batches, recorder, False, offload, twin, remaining)
                release_freed_memory()  # the pass's activations, before the Hessians are inverted
                group = [t for t in remaining if t.name in recorder.group]
                if not group:
                    break
                prune_unit(unit, group, recorder.stats)
                pruned_any = True
                del recorder
                release_freed_memory()
                pruned = {t.name for t in group}
                remaining = [t for t in remaining if t.name not in pruned]
            done = {t.name for t in unit.targets if supports(t)} - {t.name for t in remaining}
            rest = [t for t in unit.targets if t.name not in done]
            if rest:
                prune_unit(unit, rest, {})
                pruned_any = True
            following = units[pos + 1] if pos + 1 < len(units) else None
            if following is not None and following.chained and following.seen:
                carry = _run_block(unit.block, carry, batches, None, True, offload)
                dense_carry = None if twin is None else _run_block(twin.block, twin.inputs, batches, None, True, offload)
                release_freed_memory()
            else:
                carry = dense_carry = None
            del twin
            if unload is not None:
                unload(unit)
        else:
            carry = dense_carry = None
            recorder = Recorder(unit.targets, hessian=hessian, absolute=absolute)
            if unit.seen and unit.targets:
                with recorder.record():
                    _run_until(model, unit.targets[0].module, batches, recorder)
            prune_unit(unit, unit.targets, recorder.stats)
            pruned_any = pruned_any or bool(unit.targets)
        if on_unit is not None:
            on_unit(unit)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Tensors:
    """A safetensors file read one tensor at a time with plain reads (no memory map, so
    nothing read stays resident once it is dropped)."""

    def __init__(self, path: Any):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self.head = f.read(size)
                header = __import__("json").loads(self.head)
        except (OSError, ValueError) as exc:
            raise SecateursError(f"weights: got {str(path)!r}, which is not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise SecateursError(f"weights: got {key!r} of dtype {entry['dtype']}; allowed: {', '.join(_DTYPES)}")
            begin, end = entry["data_offsets"]
            self.entries[key] = (_DTYPES[entry["dtype"]], tuple(entry["shape"]), begin, end)

    def read(self, key: str, source: Any = None) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        buffer = bytearray(end - begin)
        with open(source or self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class Streamed:
    """A model whose parameters and buffers live in a safetensors file, not in memory.

    The model is built with its parameters on the ``meta`` device (its non-persistent buffers,
    such as rotary frequencies, real). Everything outside the blocks is read in at once; a
    block's tensors are read in when it runs (:meth:`load`, or a pre-hook during a forward of
    the whole model) and written, pruned, into the output file and dropped again afterwards
    (:meth:`unload`): the output has the source's header, so every tensor has its slot. A block
    already written is read back from the output, so later forwards see it pruned.
    """

    def __init__(self, model: nn.Module, source: Any, out: Any, blocks: Sequence[tuple[str, int, nn.Module]]):
        import os
        import tempfile
        from pathlib import Path

        self.model = model
        self.file = _Tensors(source)
        self.out = Path(out)
        self.blocks = {id(block): (f"{c}.{i}" if c else str(i)) for c, i, block in blocks}
        owners: dict[str, tuple[nn.Module, str, bool]] = {}
        for mname, module in model.named_modules():
            for attr, value in list(module._parameters.items()) + list(module._buffers.items()):
                if value is None:
                    continue
                key = f"{mname}.{attr}" if mname else attr
                owners[key] = (module, attr, attr in module._parameters)
        first: dict[int, str] = {}
        for k, (m, a, _) in owners.items():
            if k in self.file.entries:
                first.setdefault(id(getattr(m, a)), k)
        self.tied = {k: first[id(getattr(m, a))] for k, (m, a, _) in owners.items()
                     if first.get(id(getattr(m, a)), k) != k}
        """Key -> the key it shares its tensor with (tied weights are read and kept once)."""
        missing = [k for k in owners if k not in self.file.entries and k not in self.tied and _is_meta(owners[k])]
        if missing:
            raise SecateursError(f"weights: got {str(source)!r} without {missing[:3]}; allowed: the model's own state dict")
        self.owners = owners
        self.of_block: dict[str, list[str]] = {}
        for prefix in self.blocks.values():
            self.of_block[prefix] = [k for k in owners if k.startswith(prefix + ".") and k in self.file.entries
                                     and k not in self.tied]
        in_blocks = {k for keys in self.of_block.values() for k in keys}
        self.outer = [k for k in owners if k not in in_blocks and k in self.file.entries and k not in self.tied]
        self.loaded: set[str] = set()
        self.pinned: set[str] = set()
        self.written: set[str] = set()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        from secateurs.serialization import file_mode

        os.fchmod(fd, file_mode())
        self.handle = os.fdopen(fd, "wb+")
        self.handle.write(len(self.file.head).to_bytes(8, "little") + self.file.head)
        total = max((e[3] for e in self.file.entries.values()), default=0)
        self.handle.truncate(self.file.start + total)
        for key in self.outer:
            self._set(key, self.file.read(key))
        self._hooks = []
        for _, _, block in blocks:
            self._hooks.append(block.register_forward_pre_hook(self._pre, prepend=True))
            self._hooks.append(block.register_forward_hook(self._post, prepend=True))

    def _set(self, key: str, value: torch.Tensor) -> None:
        module, attr, is_param = self.owners[key]
        self._assign(module, attr, value, is_param)
        for other, source in self.tied.items():
            if source == key:  # a tied weight (an LM head sharing the embedding) is the same object
                omod, oattr, _ = self.owners[other]
                if is_param:
                    omod._parameters[oattr] = module._parameters[attr]
                else:
                    omod._buffers[oattr] = module._buffers[attr]

    @staticmethod
    def _assign(module: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> None:
        if is_param:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        else:
            module._buffers[attr] = value

    def load(self, unit_or_block: Any) -> None:
        block = getattr(unit_or_block, "block", unit_or_block)
        prefix = self.blocks[id(block)]
        if prefix in self.loaded:
            self.pinned.add(prefix)
            return
        for key in self.of_block[prefix]:
            self._set(key, self.file.read(key, self.tmp if key in self.written else None))
        self.loaded.add(prefix)
        self.pinned.add(prefix)

    def unload(self, unit_or_block: Any, *, write: bool = True) -> None:
        block = getattr(unit_or_block, "block", unit_or_block)
        prefix = self.blocks[id(block)]
        if prefix not in self.loaded:
            return
        for key in self.of_block[prefix]:
            module, attr, is_param = self.owners[key]
            value = getattr(module, attr)
            if write:
                self._write(key, value)
            meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
            self._assign(module, attr, meta, is_param)
        self.handle.flush()  # read back through another handle by later forwards
        self.loaded.discard(prefix)
        self.pinned.discard(prefix)
        release_freed_memory()  # the block's weights are gone: keep the peak at one block

    def _write(self, key: str, value: torch.Tensor) -> None:
        dtype, shape, begin, end = self.file.entries[key]
        data = value.detach().to("cpu", dtype).contiguous()
        assert tuple(data.shape) == shape
        self.handle.seek(self.file.start + begin)
        if end > begin:
            self.handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.written.add(key)

    def _pre(self, block: nn.Module, args: tuple) -> None:
        prefix = self.blocks[id(block)]
        if prefix not in self.loaded:
            for key in self.of_block[prefix]:
                self._set(key, self.file.read(key, self.tmp if key in self.written else None))
            self.loaded.add(prefix)

    def _post(self, block: nn.Module, args: tuple, output: Any) -> None:
        prefix = self.blocks[id(block)]
        if prefix in self.loaded and prefix not in self.pinned:
            self.unload(block, write=False)

    def finish(self) -> None:
        """Write every tensor outside the blocks (and any block never run), then move the
        output into place; the model is left with its outer tensors and meta blocks."""
        import os

        for key in self.outer:
            module, attr, _ = self.owners[key]
            self._write(key, getattr(module, attr))
        for keys in self.of_block.values():
            for key in keys:
                if key not in self.written:
                    self._write(key, self.file.read(key))
        for key, source in self.tied.items():
            if key in self.file.entries:
                value = getattr(*self.owners[source][:2])
                self._write(key, self.file.read(source, self.tmp) if value.device.type == "meta" else value)
        self.close()
        os.replace(self.tmp, self.out)

    def close(self, *, discard: bool = False) -> None:
        import os

        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if not self.handle.closed:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
        if discard and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _is_meta(owner: tuple[nn.Module, str, bool]) -> bool:
    module, attr, _ = owner
    value = getattr(module, attr)
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


@contextlib.contextmanager
def empty_weights() -> Any:
    """Build a model with its parameters on the ``meta`` device (no memory) and its buffers
    real, for :func:`~secateurs.prune.oneshot_streamed`:

    >>> with empty_weights():
    ...     layer = nn.Linear(4, 2)
    >>> layer.weight.device.type
    'meta'
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied (shared) parameter stays shared
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
