"""``report.json`` / ``report.md`` (per-layer table, quality before and after), ``timings.json``
and ``layers.png`` (per-layer sparsity and reconstruction error). The report holds no duration,
so identical runs write identical reports; durations go to ``timings.json``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from secateurs.prune.calibration.results import OneshotResult
from secateurs.serialization import atomic_write_bytes, atomic_write_text

__all__ = ["write_report"]


def write_report(folder: Path, result: OneshotResult, header: dict[str, Any], quality: dict[str, Any]) -> None:
    report = {**header, "sparsity": result.sparsity, "quality": quality, "oneshot": result.to_dict(timings=False)}
    atomic_write_text(folder / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(folder / "report.md", _markdown(header, quality, result))
    timings = {"seconds": result.seconds, "layers": {layer.name: layer.seconds for layer in result.layers}}
    atomic_write_text(folder / "timings.json", json.dumps(timings, indent=1) + "\n")
    atomic_write_bytes(folder / "layers.png", _plot(result))


def _markdown(header: dict[str, Any], quality: dict[str, Any], result: OneshotResult) -> str:
    lines = [f"# secateurs prune: {header['model']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key != "model"]
    lines += [f"- sparsity of the targeted weights: {result.sparsity:.4f}", ""]
    if quality:
        lines += ["## Quality on --eval", "", "| metric | dense | pruned |", "|---|---|---|"]
        dense, pruned = quality.get("dense", {}), quality.get("pruned", {})
        for key in sorted(set(dense) | set(pruned)):
            lines.append(f"| {key} | {dense.get(key, float('nan')):.4f} | {pruned.get(key, float('nan')):.4f} |")
        for key, value in sorted(quality.get("agreement", {}).items()):
            lines.append(f"| {key} (pruned vs dense) | 1.0000 | {value:.4f} |")
        lines.append("")
    lines += ["## Layers", "", result.to_markdown(timings=False)]
    grown = result.damping_grown
    if grown:
        lines += ["", f"Dampening grew on {len(grown)} layer(s) whose Cholesky factorisation failed: "
                  + ", ".join(f"{g.name} ({g.damping:g})" for g in grown), ""]
    return "\n".join(lines)


def _plot(result: OneshotResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name.removesuffix(".weight") for layer in result.layers]
    x = range(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(names)), 6), sharex=True)
    top.bar(x, [layer.sparsity for layer in result.layers], color="tab:blue")
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    bottom.bar(x, [layer.error or 0.0 for layer in result.layers], color="tab:red")
    bottom.set_ylabel("rel. reconstruction error")
    bottom.set_xticks(list(x), names, rotation=90, fontsize=6)
    fig.suptitle(f"{result.method}{' ' + result.pattern if result.pattern else ''}: sparsity {result.sparsity:.3f}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
