"""The figures of ``secateurs sweep`` and ``secateurs sensitivity``, rendered off-screen to PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(summary: Mapping[str, Any]) -> dict[str, list[tuple[float, Any]]]:
    """Label -> [(sparsity, stats)] sorted by sparsity; the clip rule joins the label when it varies."""
    clips = {clip for clip, _, _ in summary["cells"]}
    series: dict[str, list[tuple[float, Any]]] = {}
    for (clip, criterion, sparsity), stats in summary["cells"].items():
        label = criterion if len(clips) == 1 else f"{criterion} / {clip}"
        series.setdefault(label, []).append((sparsity, stats))
    return {label: sorted(points, key=lambda p: p[0]) for label, points in series.items()}


def _draw_tradeoff(ax: Any, summary: Mapping[str, Any], series: Mapping[str, Sequence[tuple[float, Any]]]) -> None:
    for label, points in series.items():
        x = [stats["compression_ratio"].mean for _, stats in points]
        y = [100 * stats["accuracy"].mean for _, stats in points]
        std = [100 * stats["accuracy"].std for _, stats in points]
        (line,) = ax.plot(x, y, "o-", ms=4, lw=1.5, label=label)
        ax.fill_between(x, [a - s for a, s in zip(y, std, strict=True)], [a + s for a, s in zip(y, std, strict=True)], color=line.get_color(), alpha=0.18, lw=0)
    for clip, stat in summary["dense"].items():
        name = "dense" if len(summary["dense"]) == 1 else f"dense / {clip}"
        ax.axhline(100 * stat.mean, color="black", ls="--", lw=1, label=f"{name} ({100 * stat.mean:.1f}%)")
        ax.axhspan(100 * (stat.mean - stat.std), 100 * (stat.mean + stat.std), color="black", alpha=0.06, lw=0)
    ax.set_xscale("log")
    ticks: dict[float, list[float]] = {}
    for points in series.values():
        for sparsity, stats in points:
            ticks.setdefault(sparsity, []).append(stats["compression_ratio"].mean)
    positions = {s: sum(v) / len(v) for s, v in ticks.items()}
    ax.set_xticks(list(positions.values()))
    ax.set_xticklabels([f"{c:.3g}x\n{100 * s:g}%" for s, c in positions.items()], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def tradeoff_png(summary: Mapping[str, Any], *, title: str = "") -> bytes:
    """Test accuracy against compression ratio (log axis): one line per criterion with a band of
    ± one standard deviation over seeds, and the dense accuracy as a dashed reference line.

    When the worst point lies more than 10 points below dense, a second panel zooms in on the
    top 6 points (below the best mean, dense or pruned) so that close criteria stay apart.
    """
    return _png(tradeoff_figure(summary, title=title))


def tradeoff_figure(summary: Mapping[str, Any], *, title: str = "") -> Figure:
    """The figure of :func:`tradeoff_png` (its axes are ``fig.axes``)."""
    series = _series(summary)
    dense_top = max(100 * stat.mean for stat in summary["dense"].values())
    means = [100 * stats["accuracy"].mean for points in series.values() for _, stats in points]
    lowest, highest = min(means), max(means)
    zoom = dense_top - lowest > 10
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 8, 5), squeeze=False)
    for ax in axes[0]:
        _draw_tradeoff(ax, summary, series)
        ax.set_xlabel("compression: dense / non-zero parameters (log scale), target sparsity")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    axes[0][0].set_title(f"Accuracy vs compression{': ' + title if title else ''}")
    if zoom:
        top = max(dense_top, highest)
        axes[0][1].set_ylim(top - 6, top + 0.5)
        axes[0][1].set_title(f"zoom: the top 6 points, {top - 6:.1f}% to {top:.1f}%")
    return fig


def sensitivity_png(curve_rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any]) -> bytes:
    """Left: validation accuracy against sparsity with only one layer pruned, one line per layer.
    Right: each layer's sparsity as searched, uniform layer-wise and under one global ranking."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    layers = [layer["key"] for layer in result["layers"]]
    params = {layer["key"]: layer["params"] for layer in result["layers"]}
    for key in layers:
        points = sorted((r["sparsity"], r["val_accuracy"]) for r in curve_rows if r["layer"] == key)
        left.plot([0.0] + [100 * s for s, _ in points], [100 * result["dense"]["val_accuracy"]] + [100 * a for _, a in points], "o-", ms=3, label=f"{key} ({params[key]:,})")
    left.axhline(100 * result["dense"]["val_accuracy"], color="black", ls="--", lw=1, label="dense")
    left.set_xlabel("sparsity of that layer alone (%)")
    left.set_ylabel("validation accuracy (%), one-shot, no fine-tuning")
    left.set_title(f"Per-layer sensitivity ({result['criterion']})")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    width = 0.27
    xs = range(len(layers))
    for i, (name, label) in enumerate((("search", "searched"), ("uniform", "uniform layer-wise"), ("global", "global ranking"))):
        ev = result[name]
        right.bar([x + (i - 1) * width for x in xs], [100 * ev["layers"][k] for k in layers], width,
                  label=f"{label}: val {100 * ev['val_accuracy']:.1f}%")
    right.set_xticks(list(xs))
    right.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("layer sparsity (%)")
    right.set_ylim(0, 130)
    right.set_title(f"Allocations at {100 * result['search']['sparsity']:.1f}% overall sparsity")
    right.legend(fontsize=8, loc="upper left")
    return _png(fig)
