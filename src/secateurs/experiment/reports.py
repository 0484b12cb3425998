"""What a run leaves behind for a person: report.json, report.md, accuracy.png, grad_norm.png."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from secateurs import clip, measure, prune
from secateurs.experiment.config import RunConfig
from secateurs.experiment.data import Dataset
from secateurs.serialization import atomic_write_bytes, atomic_write_text


def cost(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """MACs and latency (median ms of 30 runs, on the device ``model`` and ``example`` are on) of ``model`` on ``example``."""
    return {
        "macs": measure.count_macs(model, example),
        "latency_ms": measure.measure_latency(model, example, runs=30),
    }


@dataclass
class _PhaseBar:
    progress: Progress | None
    task: Any
    phase: str

    def advance(self, row: Mapping[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                advance=1,
                status=f"loss {row['loss']:.3f}  val acc {row['val_accuracy']:.3f}  sparsity {row['sparsity']:.2f}",
            )


class _Bars:
    def __init__(self, progress: Progress | None):
        self.progress = progress

    def phase(self, name: str, total: int, *, completed: int = 0) -> _PhaseBar:
        if self.progress is None:
            return _PhaseBar(None, None, name)
        task = self.progress.add_task(name, total=total, completed=completed, status="")
        return _PhaseBar(self.progress, task, name)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[_Bars]:
    """One rich progress bar per phase (dense, prune, finetune), on stderr."""
    if not enabled:
        yield _Bars(None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
    )
    with progress:
        yield _Bars(progress)


def build_report(
    *,
    cfg: RunConfig,
    data: Dataset,
    model: nn.Module,
    example: torch.Tensor,
    targets: Mapping[str, int],
    dense: Mapping[str, Any],
    final_accuracy: float,
    final_val_accuracy: float,
    checkpoint_bytes: int,
    log: clip.ClipLog,
    history: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    world_size: int = 1,
    pattern_misfits: Mapping[str, int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The report.json dictionary (accuracies are fractions in [0, 1]).

    ``pattern_misfits``: the weights that cannot follow ``prune.pattern`` -> the length of their
    input dimension (see :func:`~secateurs.experiment.pruning.pattern_misfits`).
    """
    params = dict(model.named_parameters())
    target_total = sum(targets.values())
    target_zeros = sum(int((params[name] == 0).sum()) for name in targets if name in params)
    all_params = sum(p.numel() for p in params.values())
    nonzero = sum(int(p.count_nonzero()) for p in params.values())
    layers = prune.sparsity_report(model, example).to_dict()
    sparsity = target_zeros / target_total if target_total else 0.0
    record = prune.pruning_record(model)
    return {
        "dataset": data.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "world_size": world_size,
        "device": device,
        "dense": dict(dense),
        "final": {
            "accuracy": final_accuracy,
            "val_accuracy": final_val_accuracy,
            "sparsity": sparsity,
            "params": all_params,
            "nonzero_params": nonzero,
            "compression_ratio": dense["params"] / max(nonzero, 1),
            "checkpoint_bytes": checkpoint_bytes,
            **cost(model, example),
        },
        "clip": {
            "method": cfg.clip.method,
            "params": cfg.clip.params(),
            "clipped_steps": log.clipped_steps,
            "skipped_steps": log.skipped_steps,
            "total_steps": log.total_steps,
        },
        "prune": {
            "kind": cfg.prune.kind,
            "criterion": cfg.prune.criterion,
            "scope": cfg.prune.scope,
            "schedule": cfg.prune.schedule,
            "target_sparsity": cfg.prune.sparsity if cfg.prune.threshold is None else None,
            "threshold": cfg.prune.threshold,
            # unstructured: the targeted weights at zero; structured: the channels removed
            "reached_sparsity": record["sparsity"] if record is not None else sparsity,
            "pattern": cfg.prune.pattern,
            "pattern_misfits": dict(pattern_misfits or {}),
            "layers": layers,
        },
        "history": list(history),
        "wall_seconds": wall_seconds,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _sparse_macs_row(dense: Mapping[str, Any], prune_report: Mapping[str, Any]) -> list[str]:
    """The MACs left if kernels skipped the zeroed weights (unstructured pruning only: after
    structured pruning the MACs row already counts the smaller model)."""
    sparse = prune_report["layers"].get("sparse_flops")
    if prune_report["kind"] != "unstructured" or sparse is None:
        return []
    return [
        f"| MACs if zero weights were skipped | {dense['macs']:,} | {sparse:,} | "
        f"{dense['macs'] / max(sparse, 1):.2f}x fewer |"
    ]


def _fewer(before: int | float, after: int | float, word: str = "fewer") -> str:
    """``"3.20x fewer"``, or ``"same"`` when nothing changed (and ``"1.25x more"`` if it grew)."""
    if after == before:
        return "same"
    if after > before:
        return f"{after / max(before, 1):.2f}x more"
    return f"{before / max(after, 1):.2f}x {word}"


def _pattern_lines(p: Mapping[str, Any]) -> list[str]:
    """What an N:M pattern and a sparsity did together, and the layers that could not follow it."""
    if not p.get("pattern"):
        return []
    n, m = (int(v) for v in str(p["pattern"]).split(":"))
    alone = 1 - n / m
    goal = p.get("target_sparsity")
    if goal is None:
        then = f"then every weight scoring below the threshold {p.get('threshold')}"
    elif goal > alone:
        then = f"then pruned further to the target sparsity {goal} (set prune.sparsity = {alone:g} for pure {n}:{m})"
    else:
        then = f"which is already at least the target sparsity {goal}"
    lines = [
        "",
        f"Pattern {n}:{m}: at most {n} of every {m} weights along each layer's input dimension are kept "
        f"({_pct(alone)} sparsity by itself), {then}.",
    ]
    misfits = p.get("pattern_misfits") or {}
    if misfits:
        named = ", ".join(f"`{name}` (input dimension {size})" for name, size in misfits.items())
        lines.append(f"Cannot follow {n}:{m}, their input dimension is not a multiple of {m}: {named}.")
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: the before/after table, clipping, and per-layer sparsity."""
    d, f, c, p = report["dense"], report["final"], report["clip"], report["prune"]
    lines = [
        f"# secateurs run: {report['model']} on {report['dataset']} (seed {report['seed']})",
        "",
        f"Pruning: {p['kind']}, criterion `{p['criterion']}`, scope {p['scope']}, schedule {p['schedule']}, "
        + (f"threshold {p['threshold']}" if p.get("threshold") is not None else f"target sparsity {p['target_sparsity']}")
        + (f", reached {p['reached_sparsity']:.4f}" if "reached_sparsity" in p and p["kind"] != "none" else "")
        + (f", pattern {p['pattern']}" if p.get("pattern") else "") + ".",
        f"Clipping: `{c['method']}` {c['params'] or ''}; clipped {c['clipped_steps']} of {c['total_steps']} steps, "
        f"skipped {c['skipped_steps']} non-finite steps.",
        *_pattern_lines(p),
        "",
        "| | dense | final | change |",
        "| --- | ---: | ---: | ---: |",
        f"| test accuracy | {_pct(d['accuracy'])} | {_pct(f['accuracy'])} | {100 * (f['accuracy'] - d['accuracy']):+.2f} pts |",
        f"| parameters | {d['params']:,} | {f['params']:,} | |",
        f"| non-zero parameters | {d['params']:,} | {f['nonzero_params']:,} | {f['compression_ratio']:.1f}x fewer |",
        f"| prunable weights at zero | 0.00% | {_pct(f['sparsity'])} | |",
        f"| MACs | {d['macs']:,} | {f['macs']:,} | {_fewer(d['macs'], f['macs'])} |",
        *_sparse_macs_row(d, p),
        f"| checkpoint bytes | {d['checkpoint_bytes']:,} | {f['checkpoint_bytes']:,} | {_fewer(d['checkpoint_bytes'], f['checkpoint_bytes'], 'smaller')} |",
        f"| {report.get('device', 'cpu').partition(':')[0].upper()} latency (ms, batch {32}) | {d['latency_ms']:.3f} | {f['latency_ms']:.3f} | |",
        "",
        "Masks do not make dense kernels faster: latency falls only with structured pruning.",
        "",
        "## Per-layer sparsity",
        "",
        "| layer | shape | params | zeros | sparsity |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for layer in p["layers"]["layers"]:
        lines.append(
            f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {layer['params']:,} | {layer['zeros']:,} | {_pct(layer['sparsity'])} |"
        )
    lines += ["", f"Wall time: {report['wall_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def write_all(out: Path, report: Mapping[str, Any], log: clip.ClipLog, history: Sequence[Mapping[str, Any]]) -> None:
    """Write report.md, both plots, then report.json (each atomically): report.json marks a
    finished run, so it is written last."""
    from secateurs.experiment import plots

    atomic_write_text(out / "report.md", markdown(report))
    atomic_write_bytes(out / "accuracy.png", plots.accuracy_png(history))
    atomic_write_bytes(out / "grad_norm.png", plots.grad_norm_png(log, history))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
