"""Running ``secateurs run`` under ``torchrun``: one process per rank, DDP training, rank 0 writes.

``torchrun --nproc-per-node N -m secateurs run ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`process_group` turns those into a ``torch.distributed`` process group (gloo for CPU
tensors, NCCL for CUDA tensors) for the length of a run; everything else here is a small helper
the run calls at the points where ranks must agree:

* :func:`wrap_ddp` makes the model average its gradients over ranks, so the clip rule, which
  runs after ``backward()``, sees the global gradient and computes the same norm on every rank;
* :func:`check_same_on_every_rank` compares a checksum of the masks after every pruning step and
  stops the run with a :class:`~secateurs.errors.SecateursError` if any rank disagrees;
* :func:`is_main` guards every file write (rank 0 writes, the others only read).

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op and a run is exactly
the single-process run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from secateurs.errors import SecateursError

__all__ = [
    "all_mean",
    "any_rank",
    "barrier",
    "check_same_on_every_rank",
    "checksum",
    "is_main",
    "process_group",
    "rank",
    "world_size",
    "wrap_ddp",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 outside torch.distributed)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the default group (0 outside torch.distributed)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SecateursError(f"{name}: got {value!r}; allowed: an integer (set by torchrun)") from None


@contextmanager
def process_group() -> Iterator[int]:
    """Join the process group ``torchrun`` describes for the duration of the block; yields the
    world size.

    Nothing happens when ``WORLD_SIZE`` is unset or 1, or when the caller already initialised
    ``torch.distributed`` (its group is used and left alone). A group started here is destroyed
    on exit. On a machine with CUDA, CUDA tensors go through NCCL and CPU tensors through gloo,
    and each process uses the GPU ``LOCAL_RANK`` names (if there is one).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or _active():
        yield world_size()
        return
    if not dist.is_available():
        raise SecateursError(f"WORLD_SIZE: got {world}; this torch build has no torch.distributed, allowed: 1")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        local_rank = _env_int("LOCAL_RANK", 0)
        if local_rank < torch.cuda.device_count():  # more CPU ranks than GPUs is fine on gloo
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    try:
        yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when there is more than
    one rank, else ``model`` itself.

    Keep a reference to the plain model: its parameters, state_dict keys and pruner targets are
    the same objects DDP trains, so checkpoints do not depend on the world size.
    """
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a float tensor over ranks (a copy; the tensor itself in one process)."""
    if world_size() == 1:
        return value
    total = value.detach().clone().to(torch.float64)
    dist.all_reduce(total)
    return (total / world_size()).to(value.dtype)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (every rank must call it)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hex digest of names, shapes, dtypes and bytes of ``tensors`` (any order of keys).

    >>> a = {"w": torch.tensor([True, False])}
    >>> checksum(a) == checksum({"w": torch.tensor([True, False])}), checksum(a) == checksum({"w": torch.tensor([False, True])})
    (True, False)
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensors[name].shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_on_every_rank(what: str, digest: str) -> None:
    """Stop with :class:`SecateursError` unless every rank passed the same ``digest``.

    Every rank must call it at the same point; every rank then raises the same error, so the
    run ends cleanly on all of them rather than hanging in the next collective.
    """
    if world_size() == 1:
        return
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        per_rank = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
        raise SecateursError(
            f"{what}: ranks disagree ({per_rank}); allowed: identical masks on every rank "
            "(data-dependent criteria all-reduce their scores; a custom criterion must too)"
        )
