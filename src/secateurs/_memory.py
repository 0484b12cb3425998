"""Handing the C heap's freed memory back to the operating system.

torch allocates CPU tensors with ``malloc``. glibc serves blocks under its mmap threshold from
its heap arenas, and that threshold grows to the size of the largest block freed (up to 32
MiB), so after a calibration pass of many activation-sized tensors the freed memory stays
resident: pruning a 2-layer LLaMA-shaped model left 145 MB of it after every block. One-shot
pruning promises a bounded peak, so it returns that memory between layers
(:func:`release_freed_memory`) and, while it runs, keeps the threshold low so that a
tensor-sized block is mapped on its own and unmapped when it is freed (:func:`bounded_heap`):
trimming only returns whole free pages at the points it is called, and between those points
the blocks of a fragmented heap add up (80 MB of a 12-layer LLaMA's streamed SparseGPT peak).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["bounded_heap", "release_freed_memory"]

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_THRESHOLD = 64 * 1024
"""Blocks from this size up are mapped on their own: a 1024-wide row of float32 is 4 KiB, a
batch of activations or a weight matrix hundreds of KiB to MiB."""
_GLIBC_DEFAULT = 128 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (another C library or platform)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None."""
    libc = _libc()
    return None if libc is None else libc.malloc_trim  # type: ignore[no-any-return]


def release_freed_memory() -> bool:
    """Give the free pages of the C heap back to the operating system (``malloc_trim(0)``);
    returns whether that was possible here. Memory still in use is untouched."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_depth = 0


@contextmanager
def bounded_heap() -> Iterator[bool]:
    """Inside, glibc maps every block of 64 KiB or more on its own (``mallopt``'s
    ``M_MMAP_THRESHOLD``), so freeing a tensor hands its memory back at once; yields whether
    that was possible here. On leaving the outermost one the threshold is glibc's starting
    128 KiB again, fixed: glibc stops raising it after a large free once it has been set.
    """
    global _depth
    libc = _libc()
    if libc is None:
        yield False
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
