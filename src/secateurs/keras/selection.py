"""Scores -> masks: per layer or global, by a target sparsity or an N:M pattern.

Runs on the host in numpy (a pruning step is every ``frequency`` batches, not every step), the
same on every backend. Weights already pruned score ``-inf``, so a mask only ever loses ones:
pruned weights never come back. The kept count per layer is TFMOT's,
``max(round(n * (1 - sparsity)), 1)``, and ties break towards the lower flat index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from secateurs.errors import check, check_choice

__all__ = ["SCOPES", "parse_pattern", "select"]

SCOPES = ("layer", "global")


def parse_pattern(pattern: object, field: str = "pattern") -> tuple[int, int] | None:
    """``"N:M"`` (or ``(N, M)``) as a pair of ints with ``1 <= N < M``; None stays None."""
    if pattern is None:
        return None
    allowed = "None, or 'N:M' with integers 1 <= N < M, e.g. '2:4' (keep 2 of every 4)"
    pair: tuple[object, ...] = ()
    if isinstance(pattern, str) and pattern.count(":") == 1:
        a, b = pattern.split(":")
        pair = (int(a), int(b)) if a.strip().isdigit() and b.strip().isdigit() else ()
    elif isinstance(pattern, tuple | list) and len(pattern) == 2:
        pair = tuple(pattern)
    ok = len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    check(ok and 1 <= pair[0] < pair[1], field, pattern, allowed)  # type: ignore[operator]
    return pair  # type: ignore[return-value]


def _keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.shape, np.uint8)
    mask[order[:keep]] = 1
    return mask.reshape(scores.shape)


def _kept(n: int, sparsity: float) -> int:
    return max(int(np.round(n * (1.0 - sparsity))), 1)


def _n_of_m(scores: np.ndarray, n: int, m: int, axis: int, name: str) -> np.ndarray:
    moved = np.moveaxis(scores, axis, -1)
    size = moved.shape[-1]
    check(size % m == 0, "pattern", f"{n}:{m}", f"M dividing the input axis of every target ({name} has {size})")
    groups = moved.reshape(*moved.shape[:-1], size // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    mask = np.zeros(groups.shape, np.uint8)
    np.put_along_axis(mask, order[..., :n], 1, axis=-1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def select(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    sparsity: float,
    *,
    scope: str = "layer",
    pattern: tuple[int, int] | None = None,
    group_axes: Sequence[int] = (),
    names: Sequence[str] = (),
) -> list[np.ndarray]:
    """New uint8 masks keeping the highest scores: ``sparsity`` of each target (``"layer"``)
    or of all targets together (``"global"``); with ``pattern`` (N, M), N of every M weights
    along each target's input axis instead."""
    check_choice(scope, "scope", SCOPES)
    live = [np.where(m.astype(bool), s.astype(np.float32), -np.inf) for s, m in zip(scores, masks, strict=True)]
    if pattern is not None:
        n, m = pattern
        return [
            _n_of_m(s, n, m, axis, name) & old.astype(np.uint8)
            for s, old, axis, name in zip(live, masks, group_axes, names, strict=True)
        ]
    if scope == "layer":
        return [_keep_top(s, _kept(s.size, sparsity)) for s in live]
    flat = np.concatenate([s.reshape(-1) for s in live])
    joint = _keep_top(flat, _kept(flat.size, sparsity))
    out, start = [], 0
    for s in live:
        out.append(joint[start : start + s.size].reshape(s.shape))
        start += s.size
    return out
