"""ClipLog: per-step clipping statistics, collected off the hot path.

Recording a step stacks its stats into one small tensor on the device (no host read); every
``chunk`` steps the pending rows are stacked again into a block, so a long run holds a few
hundred device tensors, not one per step. Values reach the host only when a list or a count
is asked for (for a report, a plot or a checkpoint); that read is the only sync.

>>> import torch
>>> from secateurs.clip.stats import ClipStats
>>> log = ClipLog()
>>> log.record(ClipStats.unclipped(torch.tensor(2.0)), skipped=torch.tensor(False))
>>> log.norms(), log.skipped(), log.total_steps
([2.0], [False], 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from secateurs.clip.stats import ClipStats
from secateurs.errors import check

__all__ = ["ClipLog"]

_COLUMNS = ("norm_before", "norm_after", "threshold", "clipped", "skipped")


class ClipLog:
    """Per-step norms, thresholds and clipped/skipped flags of a clipped optimizer.

    A skipped step (non-finite gradients under ``nonfinite="skip"``) is recorded with its
    non-finite norm and counts as skipped, never as clipped.
    """

    def __init__(self, *, chunk: int = 256) -> None:
        check(isinstance(chunk, int) and chunk >= 1, "chunk", chunk, "an integer >= 1")
        self._chunk = chunk
        self._pending: list[Tensor] = []  # one [5] row per step, on the device
        self._blocks: list[Tensor] = []  # [k, 5] stacks of pending rows, on the device
        self._host: list[list[float]] = [[] for _ in _COLUMNS]  # materialised columns
        self._queued = 0

    def record(self, stats: ClipStats, *, skipped: Tensor | bool = False) -> None:
        """Append one step; no host read."""
        device = stats.norm_before.device
        skip = skipped if isinstance(skipped, Tensor) else torch.tensor(skipped)
        row = torch.stack(
            [
                stats.norm_before.float(),
                stats.norm_after.float().to(device),
                stats.threshold.float().to(device),
                stats.clipped.float().to(device),
                skip.float().to(device),
            ]
        )
        self._pending.append(row)
        self._queued += 1
        if len(self._pending) >= self._chunk:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            by_device: dict[torch.device, list[Tensor]] = {}
            for row in self._pending:
                by_device.setdefault(row.device, []).append(row)
            if len(by_device) == 1:
                self._blocks.append(torch.stack(self._pending))
            else:  # rows from several devices: keep order by stacking each row alone
                self._blocks.extend(r.unsqueeze(0) for r in self._pending)
            self._pending = []

    def _materialise(self) -> None:
        self._flush_pending()
        if not self._blocks:
            return
        for block in self._blocks:
            for col, values in zip(self._host, block.cpu().t().tolist(), strict=True):
                col.extend(values)
        self._blocks = []
        self._queued = 0

    def _column(self, name: str) -> list[float]:
        self._materialise()
        return list(self._host[_COLUMNS.index(name)])

    def norms(self) -> list[float]:
        """Total gradient norm before clipping, one per step."""
        return self._column("norm_before")

    def norms_after(self) -> list[float]:
        """Total gradient norm after clipping, one per step."""
        return self._column("norm_after")

    def thresholds(self) -> list[float]:
        """The rule's threshold per step (``inf`` where it would not clip at any norm)."""
        return self._column("threshold")

    def clipped(self) -> list[bool]:
        """Whether the step clipped (False on skipped steps)."""
        self._materialise()
        clip, skip = self._host[3], self._host[4]
        return [bool(c) and not bool(s) for c, s in zip(clip, skip, strict=True)]

    def skipped(self) -> list[bool]:
        """Whether the step was skipped for non-finite gradients."""
        return [bool(v) for v in self._column("skipped")]

    @property
    def total_steps(self) -> int:
        """Number of recorded steps (no host read)."""
        return len(self._host[0]) + self._queued

    @property
    def clipped_steps(self) -> int:
        return sum(self.clipped())

    @property
    def skipped_steps(self) -> int:
        return sum(self.skipped())

    def __len__(self) -> int:
        return self.total_steps

    def state_dict(self) -> dict[str, Any]:
        """All recorded steps, one float64 CPU tensor per column (reads the device once)."""
        self._materialise()
        return {
            name: torch.tensor(col, dtype=torch.float64)
            for name, col in zip(_COLUMNS, self._host, strict=True)
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the log with a saved one (tensors or lists); later records continue after it."""
        field = "state_dict"
        check(set(state_dict) == set(_COLUMNS), field, sorted(state_dict), str(list(_COLUMNS)))
        columns = [
            [float(v) for v in (c.tolist() if isinstance(c, torch.Tensor) else c)]
            for c in (state_dict[name] for name in _COLUMNS)
        ]
        lengths = sorted({len(c) for c in columns})
        check(len(lengths) == 1, field, lengths, "columns of equal length")
        self._pending, self._blocks, self._queued = [], [], 0
        self._host = columns

    def __repr__(self) -> str:
        return f"ClipLog(total_steps={self.total_steps})"
