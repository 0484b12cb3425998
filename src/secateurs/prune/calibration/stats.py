"""What a layer sees on the calibration data: its inputs as a matrix, and their statistics.

Every weight is handled as a matrix ``(out, columns)`` whose columns are the input features it
multiplies: a Linear's ``in_features``; a Conv's input patch, ordered (kernel position, channel)
so that consecutive columns are consecutive input channels at one kernel position (the blocks of
an ``N:M`` pattern, as :func:`~secateurs.prune.selection.nm_keep` cuts them). :func:`input_rows`
turns a layer input into rows in that column order (``unfold`` for a convolution), and
:class:`InputStats` sums, in float32, ``H = X^T X`` (the SparseGPT Hessian, up to a factor 2),
``sum x^2`` per column (Wanda) and ``sum |x|`` per column (the activation criterion) over the
rows that are not padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.prune.masks import Target

__all__ = ["InputStats", "Recorder", "StopForward", "input_rows", "matrix_run", "set_weight_matrix", "supports", "weight_matrix"]

_CONV = (nn.Conv1d, nn.Conv2d)


def supports(target: Target) -> bool:
    """Whether the calibration methods can read this weight's inputs (Linear, Conv1d/2d with
    ``groups=1``); other prunable weights are pruned by magnitude, and the result says so."""
    module = target.module
    if target.attr != "weight":
        return False
    return isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.groups == 1)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a float32 ``(out, columns)`` matrix (a copy), columns as :func:`input_rows`."""
    w = module.weight.detach()
    if isinstance(module, _CONV):
        w = w.movedim(1, -1)  # (out, *kernel, in): channels innermost
    return w.reshape(w.shape[0], -1).to(torch.float32, copy=True)


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a matrix from :func:`weight_matrix` back into the weight, in its own dtype."""
    w = module.weight
    if isinstance(module, _CONV):
        moved = w.movedim(1, -1)
        w.copy_(matrix.reshape(moved.shape).movedim(-1, 1).to(w.dtype))
    else:
        w.copy_(matrix.reshape(w.shape).to(w.dtype))


def matrix_run(module: nn.Module) -> int:
    """How many consecutive columns belong to one kernel position: N:M blocks never cross it."""
    weight = module.weight
    return weight.shape[1] if weight.dim() > 1 else weight.shape[0]


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` with ``module(x) = X @ W.T (+ bias)`` for ``W = weight_matrix(module)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        padding: tuple[int, ...] | str = (0, *module.padding) if not isinstance(module.padding, str) else module.padding
    else:
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        pads = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if isinstance(module, nn.Conv1d):
            x = F.pad(x.squeeze(-2), pads, mode=mode).unsqueeze(-2)
        else:
            x = F.pad(x, pads, mode=mode)
        padding = 0
    if x.dim() == 3:  # unbatched
        x = x.unsqueeze(0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*k, L)
    batch, _, positions = cols.shape
    channels = module.in_channels
    cols = cols.reshape(batch, channels, -1, positions).permute(0, 3, 2, 1)  # (B, L, k, C)
    return cols.reshape(batch * positions, -1)


class InputStats:
    """Running sums over the input rows of one layer, in float32.

    With ``hessian`` it sums ``H = X^T X`` (and ``square_sum`` is its diagonal); otherwise only
    ``sum x^2`` per column. ``absolute`` adds ``sum |x|`` per column.

    >>> stats = InputStats(2, hessian=True, absolute=True)
    >>> stats.add(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    >>> stats.hessian, stats.square_sum, stats.abs_sum, stats.rows
    (tensor([[10., -2.],
            [-2.,  4.]]), tensor([10.,  4.]), tensor([4., 2.]), 2)
    """

    def __init__(self, columns: int, *, hessian: bool, absolute: bool = False, device: torch.device | str | None = None):
        self.columns = columns
        self.hessian: torch.Tensor | None = (
            torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian else None
        )
        """``sum x x^T`` over the rows (None unless asked for)."""
        self._squares = None if hessian else torch.zeros(columns, dtype=torch.float32, device=device)
        self.abs_sum: torch.Tensor | None = torch.zeros(columns, dtype=torch.float32, device=device) if absolute else None
        self.rows = 0
        self.cross_rows = 0
        self.cross: torch.Tensor | None = None
        """``sum x x_dense^T`` (``X^T X_dense``) when the dense model's inputs were given
        (:meth:`add_cross`), else None; complete only when ``cross_rows == rows``."""

    @property
    def square_sum(self) -> torch.Tensor:
        """``sum x^2`` per column."""
        if self.hessian is not None:
            return self.hessian.diagonal().clone()
        assert self._squares is not None
        return self._squares

    def add(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(torch.float32)
        if self.hessian is not None:
            if self.hessian.device != x.device:
                self.hessian = self.hessian.to(x.device)
            self.hessian.addmm_(x.T, x)
        else:
            assert self._squares is not None
            self._squares = self._squares.to(x.device).add_(x.square().sum(0))
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum.to(x.device).add_(x.abs().sum(0))
        self.rows += x.shape[0]

    def add_cross(self, rows: torch.Tensor, dense_rows: torch.Tensor) -> None:
        """Add ``rows^T dense_rows``: the same positions' inputs in the pruned and the dense model."""
        x = rows.detach().to(torch.float32)
        d = dense_rows.detach().to(device=x.device, dtype=torch.float32)
        if self.cross is None:
            self.cross = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=x.device)
        self.cross.addmm_(x.T, d)
        self.cross_rows += x.shape[0]


class StopForward(Exception):
    """Raised by a hook to end a forward once what it needed has run."""


class Recorder:
    """Forward pre-hooks that feed each target's :class:`InputStats` while :meth:`record` is active.

    ``valid`` is the current batch's ``(batch, positions)`` bool mask of real (not padding)
    positions, set by whoever runs the batches: inputs whose leading dimensions have that shape
    contribute only their valid rows.
    """

    def __init__(self, targets: Sequence[Target], *, hessian: bool, absolute: bool = False,
                 one_group: bool = False):
        self.targets = list(targets)
        self.stats: dict[str, InputStats] = {}
        self.valid: torch.Tensor | None = None
        self._hessian = hessian
        self._absolute = absolute
        self._last: tuple[torch.Tensor, int, InputStats] | None = None
        self.one_group = one_group
        """Record only the first *group* a forward reaches: the first target and those that read
        the very same input tensor (q, k and v; gate and up; a conv and its shortcut), then end
        the forward (:class:`StopForward`) at the first other target. After :meth:`freeze`
        (the first batch) the group is fixed, and later batches end the forward as soon as every
        member has read its input as often as in the first batch, before the group itself runs."""
        self.group: list[str] = []
        self._calls: dict[str, int] = {}
        self._expected: dict[str, int] | None = None
        """Calls per member in the first batch, set when the group is fixed (None until then)."""
        self._source: torch.Tensor | None = None
        self.dense: dict[str, torch.Tensor] | None = None
        """The current batch's inputs of the targets in the dense model (target name -> tensor),
        set by whoever runs the batches: targets found there also sum ``X^T X_dense``."""

    def freeze(self) -> None:
        """End of a batch: in ``one_group`` mode the group found so far is the group."""
        if self._expected is None and self.group:
            self._expected = dict(self._calls)
        self._calls = {}
        self._source = None
        self._last = None

    def _complete(self) -> bool:
        """Whether this batch has reached every member of the frozen group as often as the first."""
        expected = self._expected
        return expected is not None and all(self._calls.get(n, 0) >= k for n, k in expected.items())

    def _admit(self, name: str, x: torch.Tensor) -> None:
        """In ``one_group`` mode: whether ``name`` belongs to the group, else stop the forward."""
        if name in self.group:
            return
        if self._expected is not None or (self._source is not None and x is not self._source):
            raise StopForward
        if self._source is None:
            self._source = x
        self.group.append(name)

    def _add(self, target: Target, module: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad():
            stats = self.stats.get(target.name)
            last = self._last
            linear = isinstance(module, nn.Linear)
            if linear and last is not None and last[0] is x and last[1] == module.in_features:
                # the layer before read this very tensor (q, k and v; gate and up): share its sums
                if stats is None:
                    self.stats[target.name] = last[2]
                    return
                if stats is last[2]:
                    return
            source = x
            x = x.detach()
            valid = self.valid
            padded = valid is not None and tuple(x.shape[:-1]) == tuple(valid.shape)
            dense = None if self.dense is None else self.dense.get(target.name)
            if isinstance(module, nn.Linear) and padded:
                assert valid is not None
                x = x[valid.to(x.device)]
                if dense is not None:
                    dense = dense[valid.to(dense.device)]
            rows = input_rows(module, x)
            if stats is None:
                stats = self.stats[target.name] = InputStats(
                    rows.shape[1], hessian=self._hessian, absolute=self._absolute, device=rows.device
                )
            stats.add(rows)
            if dense is not None:
                stats.add_cross(rows, input_rows(module, dense.detach()))
            if linear:
                self._last = (source, module.in_features, stats)

    def _hook(self, target: Target) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                return
            if self.one_group:
                self._admit(target.name, x)
                self._calls[target.name] = self._calls.get(target.name, 0) + 1
            self._add(target, module, x)
            if self.one_group and self._complete():
                raise StopForward  # the rest of the forward would only run the group and after

        return hook

    @contextmanager
    def record(self) -> Iterator[Recorder]:
        handles = []
        try:
            for target in self.targets:
                if supports(target):
                    handles.append(target.module.register_forward_pre_hook(self._hook(target), with_kwargs=True))
            yield self
        finally:
            self._last = None
            for handle in handles:
                handle.remove()
