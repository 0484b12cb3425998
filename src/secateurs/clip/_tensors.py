"""Tensor plumbing shared by the clipping functions and rules.

Everything here follows ``torch/nn/utils/clip_grad.py``: tensors are grouped by (device, dtype)
so each group runs one foreach kernel, norms stay tensors, and nothing reads a device value on
the host. DTensor gradients are supported: norms are computed on the DTensors (so the
reduction spans every shard) and then turned into plain replicated tensors; in-place scaling
is done on the local shards, which is the same as scaling the DTensor by a replicated scalar.

``torch.distributed.tensor`` is never imported here (it costs about as much as the rest of
``import secateurs.clip``): a DTensor can only exist once someone imported that module, so
:func:`is_dtensor` looks it up in ``sys.modules`` when asked.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support

from secateurs.errors import SecateursError, check
from secateurs.errors import check_bool as check_bool  # re-exported: rules import them from here
from secateurs.errors import check_optional_bool as check_optional_bool
from secateurs.errors import check_positive as check_positive

Params = Tensor | Iterable[Tensor]
"""One tensor or an iterable of tensors (usually ``model.parameters()``)."""

# numel at or below which tensors of equal shape are stacked into one kernel (see shape_groups)
SMALL_NUMEL = 1 << 14
# numel from which a CPU 2-norm is a BLAS dot (see _norm)
DOT_NUMEL = 1 << 16
# most elements stacked at once by _cpu_norms (4 MB of float32; see shape_groups)
STACK_NUMEL = 1 << 20


def as_list(params: Params) -> list[Tensor]:
    """``params`` as a list (a single tensor becomes a one-element list)."""
    if isinstance(params, Tensor):
        return [params]
    return list(params)


def with_grad(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters that have a gradient, and those gradients, in the same order."""
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):
        return params, grads  # type: ignore[return-value]
    kept = [p for p, g in zip(params, grads, strict=True) if g is not None]
    return kept, [g for g in grads if g is not None]


@contextlib.contextmanager
def dense_grads_only(params: list[Tensor]) -> Iterator[None]:
    """Turn a failure caused by a sparse gradient among ``params`` into a clear error.

    Looked for only after something failed (a layout check of every gradient on every step
    would cost as much as clipping a small model), so a sparse gradient gets this message
    instead of ATen's missing-kernel error; other errors pass unchanged.
    """
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        for i, p in enumerate(params):
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise SecateursError(
                    f"params[{i}].grad: got a {g.layout} gradient; allowed: dense "
                    "(torch.strided) gradients; this rule needs a torch operation that this "
                    "torch has no sparse kernel for (nn.Embedding(sparse=True) makes them)",
                    field=f"params[{i}].grad",
                ) from e
        raise


_P = ParamSpec("_P")
_R = TypeVar("_R")


def dense_grads(
    fn: Callable[Concatenate[list[Tensor], _P], _R],
) -> Callable[Concatenate[Params, _P], _R]:
    """Decorate a clip function taking ``params`` first (see :func:`dense_grads_only`)."""

    @functools.wraps(fn)
    def call(params: Params, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        params = as_list(params)
        with dense_grads_only(params):
            return fn(params, *args, **kwargs)

    return call


_DTENSOR: list[type] = []  # DTensor, once torch.distributed.tensor has been imported


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` if that module was imported (by anyone), else None.

    Before that import no DTensor can exist, so None means "nothing here is a DTensor"; the
    lookup never imports the module itself.
    """
    if not _DTENSOR:
        module = sys.modules.get("torch.distributed.tensor")
        cls = getattr(module, "DTensor", None)  # None while the module is still initialising
        if cls is None:
            return None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def has_dtensor(tensors: list[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (one type check per distinct type)."""
    cls = dtensor_type()
    return cls is not None and any(issubclass(k, cls) for k in set(map(type, tensors)))


def _all_nonempty(tensors: list[Tensor]) -> bool:
    return all(t.numel() for t in tensors)


def is_dense_cpu(tensors: list[Tensor]) -> bool:
    """All on the CPU and none a DTensor: reading a value costs no device sync.

    Plain generator expressions, not ``map(attrgetter(...))``: Dynamo traces the former and
    not the latter, so a ``torch.compile(..., fullgraph=True)`` of a step gets through.
    """
    return all(t.is_cpu for t in tensors) and not has_dtensor(tensors)


def plain(t: Tensor) -> Tensor:
    """A DTensor reduction result as an ordinary (replicated) tensor; others unchanged."""
    return t.full_tensor() if is_dtensor(t) else t


def local(tensors: list[Tensor]) -> list[Tensor]:
    """Local shards of DTensors (views of the same storage); ordinary tensors unchanged."""
    if not has_dtensor(tensors):
        return tensors
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def host_values(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` in host memory, ready to copy to ``device``: pinned for a GPU, so that a copy
    with ``non_blocking=True`` is asynchronous (from ordinary memory it waits for the device: a
    host sync). torch's caching host allocator keeps the block until the copy is done."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" else host


def upload(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device`` without a host sync (see :func:`host_values`)."""
    return host_values(values, dtype, device).to(device, non_blocking=True)


def check_norm_type(norm_type: float | str, field: str = "norm_type") -> float:
    """``norm_type`` as a float p >= 1 (``inf`` or the string ``"inf"`` allowed)."""
    allowed = "a number >= 1, or inf"
    if isinstance(norm_type, str):
        check(norm_type.strip().lower() in ("inf", "infinity"), field, norm_type, allowed)
        return math.inf
    check(
        isinstance(norm_type, (int, float)) and not isinstance(norm_type, bool),
        field,
        norm_type,
        allowed,
    )
    p = float(norm_type)
    check(p >= 1.0, field, norm_type, allowed)
    return p


def _groups(
    tensors: list[Tensor],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
    """Tensors grouped by (device, dtype) with their positions in ``tensors``."""
    out: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    grouped = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    for key, ([ts], idx) in grouped.items():
        out[key] = (ts, idx)
    return out


def _foreach_ok(tensors: list[Tensor], device: torch.device) -> bool:
    return _device_has_foreach_support(device) and not any(is_dtensor(t) for t in tensors[:1])


def _norms_of_group(ts: list[Tensor], device: torch.device, p: float) -> list[Tensor]:
    if _foreach_ok(ts, device):
        return list(torch._foreach_norm(ts, p))
    return [torch.linalg.vector_norm(t, p) for t in ts]


def shape_groups(tensors: list[Tensor], *, cpu_numel: int | None = None) -> list[list[int]]:
    """Positions of ``tensors`` batched for one kernel each.

    Small tensors (``numel <= SMALL_NUMEL``) of equal shape, dtype and device share a group, to
    be stacked; each large tensor is a group of its own. Groups come in order of first
    appearance. With ``cpu_numel``, a group of CPU tensors is cut into consecutive pieces of at
    most that many elements: a stack of a few MB stays in cache between its copy and its
    reduction, and is the same allocation every step.
    """
    out: list[list[int]] = []
    small: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        key = (t.shape, t.dtype, t.device)
        group = small.get(key)
        if group is None:
            if t.numel() > SMALL_NUMEL:
                out.append([i])
                continue
            group = small[key] = []
            out.append(group)
        group.append(i)
    if cpu_numel is None:
        return out
    pieces: list[list[int]] = []
    for group in out:
        t = tensors[group[0]]
        size = max(1, cpu_numel // max(1, t.numel())) if t.is_cpu else len(group)
        pieces.extend(group[a : a + size] for a in range(0, len(group), size))
    return pieces


def _dot_ok(t: Tensor, p: float) -> bool:
    """Whether ``t``'s 2-norm is best taken as ``sqrt(dot(t, t))`` (see :func:`_dot_norm`)."""
    return (
        p == 2.0
        and t.numel() >= DOT_NUMEL
        and t.dtype in (torch.float32, torch.float64)
        and t.is_contiguous()
        and not torch.compiler.is_compiling()  # traced, the compiler picks the kernel itself
        and torch.get_num_threads() > 1
    )


def _dot_norm(t: Tensor) -> Tensor:
    """2-norm of a contiguous float tensor as ``sqrt(dot(t, t))``.

    The BLAS dot runs on all intra-op threads at memory speed, while ATen's norm reduction
    barely gains from a second thread (1.5x faster with two threads here, and closer to a
    float64 reference since BLAS keeps several partial sums).
    """
    flat = t.view(-1)
    return torch.dot(flat, flat).sqrt()


def _norm(t: Tensor, p: float) -> Tensor:
    """p-norm of one CPU tensor (:func:`_dot_norm` where :func:`_dot_ok`)."""
    return _dot_norm(t) if _dot_ok(t, p) else torch.linalg.vector_norm(t, p)


_SCRATCH = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> Tensor:
    """A CPU buffer of ``numel`` elements that this thread reuses for every stack of ``dtype``.

    A stack lives only until it is reduced, so one buffer serves them all, and it stays in
    cache. A fresh 4 MB allocation per stack goes to the system allocator, which returns it to
    the system and takes it back, page by page, in some processes and not in others: about
    1.6x slower clipping of 2000 small tensors there. Made outside inference mode, so it can
    be written in and out of it.
    """
    buffers: dict[torch.dtype, Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = buffers[dtype] = torch.empty(max(numel, STACK_NUMEL), dtype=dtype)
    return buf[:numel]


def _cpu_norms(tensors: list[Tensor], p: float, *, each: bool) -> list[Tensor]:
    """CPU norms with small tensors of one shape stacked into a single reduction.

    On the CPU a foreach kernel is a loop of per-tensor kernels, each paying a fixed setup
    cost; stacking thousands of small gradients first is several times cheaper. Large tensors
    take :func:`_norm`. Returns one p-norm per group (``each=False``) or per tensor in input
    order (``each=True``).
    """
    singles: list[int] = []
    large: list[int] = []
    stacks: list[list[int]] = []
    for group in shape_groups(tensors, cpu_numel=STACK_NUMEL):
        if len(group) > 1:
            stacks.append(group)
        elif _dot_ok(tensors[group[0]], p):
            large.append(group[0])
        else:
            singles.append(group[0])
    parts: list[Tensor] = []
    order: list[int] = []
    if singles:
        parts.extend(torch._foreach_norm([tensors[i] for i in singles], p))
        order.extend(singles)
    for i in large:
        parts.append(_dot_norm(tensors[i]))
        order.append(i)
    for group in stacks:
        first = tensors[group[0]]
        stacked = scratch(len(group) * first.numel(), first.dtype).view(len(group), *first.shape)
        torch.stack([tensors[i] for i in group], out=stacked)
        if each:
            parts.extend(torch.linalg.vector_norm(stacked.flatten(1), p, dim=1).unbind())
            order.extend(group)
        else:
            parts.append(_norm(stacked, p))
    if not each:
        return parts
    out: list[Tensor] = parts[:]
    for i, n in zip(order, parts, strict=True):
        out[i] = n
    return out


@torch.no_grad()
def total_norm(tensors: list[Tensor], norm_type: float = 2.0, *, cpu: bool | None = None) -> Tensor:
    """p-norm of all ``tensors`` viewed as one vector; a 0-d tensor, no host read.

    Off the CPU (and for DTensors) this is :func:`torch.nn.utils.get_total_norm`, the norm
    :func:`torch.nn.utils.clip_grad_norm_` computes; on the CPU small tensors are reduced in
    stacks (see :func:`_cpu_norms`), which equals it up to float rounding. ``cpu`` passes
    :func:`is_dense_cpu` if the caller already knows it.
    """
    if not tensors:
        return torch.zeros(())
    if norm_type == math.inf and not _all_nonempty(tensors):
        # an empty tensor adds nothing to the largest |element|, but ATen refuses its inf-norm
        kept = [t for t in tensors if t.numel()]
        if not kept:
            return torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
        return total_norm(kept, norm_type, cpu=cpu)
    if is_dense_cpu(tensors) if cpu is None else cpu:
        parts = _cpu_norms(tensors, norm_type, each=False)
        return parts[0] if len(parts) == 1 else combine_norms(torch.stack(parts), norm_type)
    return plain(torch.nn.utils.get_total_norm(tensors, norm_type))


@torch.no_grad()
def per_tensor_norms(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """Vector of the p-norm of each tensor, in order, on the first tensor's device."""
    if norm_type == math.inf and not _all_nonempty(tensors):
        # the inf-norm of an empty tensor is 0 (see total_norm)
        kept = [t for t in tensors if t.numel()]
        if not kept:
            return torch.zeros(len(tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        norms = per_tensor_norms(kept, norm_type)
        found = iter(norms.unbind())
        zero = norms.new_zeros(())
        return torch.stack([next(found) if t.numel() else zero for t in tensors])
    if is_dense_cpu(tensors):
        return torch.stack(_cpu_norms(tensors, norm_type, each=True))
    first = tensors[0].device
    groups = _groups(tensors)
    if len(groups) == 1:
        ((device, _), (ts, _)) = next(iter(groups.items()))
        return plain(torch.stack(_norms_of_group(ts, device, norm_type)))
    out: list[Tensor] = [tensors[0]] * len(tensors)
    for (device, _), (ts, idx) in groups.items():
        for i, n in zip(idx, _norms_of_group(ts, device, norm_type), strict=True):
            out[i] = plain(n).to(first)
    return torch.stack(out)


def combine_norms(norms: Tensor, norm_type: float) -> Tensor:
    """The total p-norm from a vector of per-part p-norms."""
    return torch.linalg.vector_norm(norms, norm_type)


@torch.no_grad()
def scale_(tensors: list[Tensor], factor: Tensor | float, *, cpu: bool | None = None) -> None:
    """Multiply every tensor in place by one factor (a 0-d tensor or a float)."""
    if not tensors:
        return
    if is_dense_cpu(tensors) if cpu is None else cpu:
        torch._foreach_mul_(tensors, factor)
        return
    tensors = local(tensors)
    for (device, _), (ts, _) in _groups(tensors).items():
        f = factor.to(device) if isinstance(factor, Tensor) else factor
        if _device_has_foreach_support(device):
            torch._foreach_mul_(ts, f)
        else:
            for t in ts:
                t.mul_(f)


@torch.no_grad()
def scale_each_(tensors: list[Tensor], factors: list[Tensor]) -> None:
    """Multiply ``tensors[i]`` in place by ``factors[i]`` (broadcastable tensors)."""
    tensors = local(tensors)
    if not tensors:
        return
    groups = _groups(tensors)
    for (device, _), (ts, idx) in groups.items():
        fs = factors if len(groups) == 1 else [factors[i] for i in idx]
        fs = [f.to(device) for f in fs] if fs[0].device != device else fs
        if _device_has_foreach_support(device):
            torch._foreach_mul_(ts, fs)
        else:
            for t, f in zip(ts, fs, strict=True):
                t.mul_(f)


def clip_coefficient(norm: Tensor, max_norm: Tensor | float) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``: the factor torch's ``clip_grad_norm_`` applies."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


_CONSTANTS: dict[tuple[float, torch.device], Tensor] = {}


def constant(value: float, device: torch.device) -> Tensor:
    """A cached 0-d float32 tensor holding ``value`` on ``device`` (filled on device, no copy)."""
    key = (value, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.full((), value, dtype=torch.float32, device=device)
        if len(_CONSTANTS) < 256:
            _CONSTANTS[key] = t
    return t
