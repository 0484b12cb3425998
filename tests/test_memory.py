"""Freed heap memory goes back to the operating system between layers of one-shot pruning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_RSS = r"""
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
"""
"""Resident memory now, in MB: the probes' reading."""

_PROBE = r"""
import json, torch
from secateurs._memory import release_freed_memory
""" + _RSS + r"""
start = rss()
chunks = [torch.ones(16 * 1024) for _ in range(4000)]  # 4,000 tensors of 64 KiB: heap blocks
last = chunks[-1]  # the newest block stays, so free() cannot shrink the heap from its top
del chunks
held = rss()
released = release_freed_memory()
print(json.dumps({"start": start, "held": held, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_freed_tensors_leave_the_resident_set_once_released() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["released"]
    assert row["held"] - row["start"] > 200  # 250 MB freed, still resident: glibc keeps it
    assert row["after"] - row["start"] < 50  # handed back


_HEAP_PROBE = r"""
import contextlib, json, sys, torch
from secateurs._memory import bounded_heap
""" + _RSS + r"""
# Freeing one 16 MiB block raises glibc's mmap threshold past 256 KiB: from then on the blocks
# below come from the heap, where a freed block stays resident.
big = torch.ones(4 * 1024 * 1024)
del big
with bounded_heap() if sys.argv[1] == "bounded" else contextlib.nullcontext():
    start = rss()
    chunks = [torch.ones(64 * 1024) for _ in range(1000)]  # 1,000 tensors of 256 KiB
    last = chunks[-1]  # the newest block stays, so free() cannot shrink the heap from its top
    del chunks
    print(json.dumps(rss() - start))
"""


def _held_after_freeing(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_inside_bounded_heap_a_freed_tensor_leaves_the_resident_set_at_once() -> None:
    assert _held_after_freeing("plain") > 200  # 250 MB freed in the heap, still resident
    assert _held_after_freeing("bounded") < 50  # each block mapped on its own, unmapped when freed
