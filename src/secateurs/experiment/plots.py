"""The figures a run and a sweep write, rendered off-screen to PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from secateurs import clip

PHASE_COLOURS = {"dense": "#e8f0fe", "prune": "#fde8e8", "finetune": "#e8f8ec"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _shade_phases(ax: Any, history: Sequence[Mapping[str, Any]]) -> None:
    start = 0.5
    for i, row in enumerate(history):
        last = i + 1 == len(history) or history[i + 1]["phase"] != row["phase"]
        if last:
            end = row["epoch"] + 0.5
            ax.axvspan(start, end, color=PHASE_COLOURS.get(row["phase"], "#eeeeee"), zorder=0)
            ax.text((start + end) / 2, 1.0, row["phase"], transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
            start = end


def accuracy_png(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Validation accuracy (left axis) and sparsity (right axis) per epoch, phases shaded."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    epochs = [row["epoch"] for row in history]
    _shade_phases(ax, history)
    ax.plot(epochs, [100 * row["val_accuracy"] for row in history], "o-", color="#1f6feb", ms=3, label="validation accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)", color="#1f6feb")
    accs = [100 * row["val_accuracy"] for row in history] or [0.0]
    ax.set_ylim(max(0.0, min(accs) - 5), 100.5)
    twin = ax.twinx()
    twin.step(epochs, [100 * row["sparsity"] for row in history], where="mid", color="#cf222e", label="sparsity")
    twin.set_ylabel("sparsity of prunable weights (%)", color="#cf222e")
    twin.set_ylim(-2, 102)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="lower left")
    ax.set_title("Validation accuracy and sparsity over the run", pad=18)
    return _png(fig)


def _shade_phases_by_step(ax: Any, history: Sequence[Mapping[str, Any]]) -> None:
    """The phases of accuracy.png on a step axis, from each epoch's running step count."""
    start, done = 0.5, 0
    for i, row in enumerate(history):
        done = row.get("steps", done)
        last = i + 1 == len(history) or history[i + 1]["phase"] != row["phase"]
        if last and "steps" in row:
            end = done + 0.5
            ax.axvspan(start, end, color=PHASE_COLOURS.get(row["phase"], "#eeeeee"), zorder=0)
            ax.text((start + end) / 2, 1.0, row["phase"], transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
            start = end


def grad_norm_png(log: clip.ClipLog, history: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """Gradient norm per step (before clipping), the clip threshold, clipped and skipped steps,
    over the phases of ``history`` shaded as in accuracy.png."""
    return _png(grad_norm_figure(log, history))


def grad_norm_figure(log: clip.ClipLog, history: Sequence[Mapping[str, Any]] = ()) -> Figure:
    """The figure of :func:`grad_norm_png`."""
    norms, thresholds = log.norms(), log.thresholds()
    clipped, skipped = log.clipped(), log.skipped()
    steps = list(range(1, len(norms) + 1))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _shade_phases_by_step(ax, history)
    ax.plot(steps, norms, lw=0.8, color="#1f6feb", label="gradient norm (before clipping)")
    finite_thresholds = [(s, t) for s, t in zip(steps, thresholds, strict=False) if t == t and t != float("inf")]
    if finite_thresholds:
        ax.plot(*zip(*finite_thresholds, strict=False), lw=1.2, color="#bf8700", label="clip threshold")
    marked = [(s, n) for s, n, c in zip(steps, norms, clipped, strict=False) if c]
    if marked:
        ax.scatter(*zip(*marked, strict=False), s=8, color="#cf222e", zorder=3, label=f"clipped ({len(marked)} steps)")
    bad = [s for s, k in zip(steps, skipped, strict=False) if k]
    for s in bad:
        ax.axvline(s, color="black", lw=0.6, ls=":")
    if bad:
        ax.plot([], [], color="black", lw=0.6, ls=":", label=f"skipped non-finite ({len(bad)} steps)")
    finite = [n for n in norms if math.isfinite(n)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("norm")
    ax.set_title("Gradient norm per step", pad=18 if history else 6)
    ax.legend(loc="upper right")
    return fig
