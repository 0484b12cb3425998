"""The epoch checkpoint of a run folder: everything needed to continue a run bit for bit.

``checkpoint.safetensors`` holds the model, the optimizer (with the clip rule's state, its log
and step count), the pruner and the schedule, the history and report so far, the wall time and
torch's RNG state. A structurally pruned model's shapes go in a side file named by epoch
(``structure-0004.safetensors``), written before the checkpoint that names it, so the
checkpoint never points at a newer shape. Every write is atomic: a run killed at any moment
resumes from the last whole epoch.

Timings (the wall time so far, the dense model's latency) go in ``timing.json`` beside it, not
in the checkpoint, so two identical runs write byte-identical checkpoints; a resumed run reads
them back. A run killed between the two writes counts one epoch's time less, and where the
timings it read lack the dense latency (killed right after the checkpoint that first holds the
dense measurement, or ``timing.json`` lost) that is measured again from ``dense.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.experiment import distributed
from secateurs.serialization import atomic_write_text, load_state, save_state

if TYPE_CHECKING:
    from secateurs.experiment.run import Run

__all__ = ["CHECKPOINT", "RunCheckpoint", "RunState", "tidy"]

CHECKPOINT = "checkpoint.safetensors"
TIMING = "timing.json"
_TIMED = ("latency_ms",)  # the keys of report["dense"] that are timings


def tidy(out: Path, *, keep_structure: str | None = None) -> None:
    """Remove what a killed run leaves behind in ``out``: temporary files of interrupted atomic
    writes (``.NAME.*.tmp``) and every shape side file but ``keep_structure`` (the one the
    checkpoint names; a newer one was written before a checkpoint the kill prevented, an older
    one was about to be removed)."""
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for side in out.glob("structure-*.safetensors"):
        if side.name != keep_structure:
            side.unlink(missing_ok=True)


@dataclass
class RunState:
    """What a checkpoint holds beyond the tensors of model, optimizer and rules."""

    epoch: int = 0  # epochs completed, over all phases
    history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    rng: torch.Tensor | None = None
    """torch's RNG state to continue from (a restored run's; None for a new run)."""


class RunCheckpoint:
    """``save(run)`` after every epoch and ``restore(run)`` on resume, in folder ``out``.

    Rank 0 writes; every rank restores from that one file.
    """

    def __init__(self, out: Path):
        self.out = out
        self.structure_file: str | None = None
        """The side file with the model's current shapes (structured runs), once one is written."""

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.out / CHECKPOINT

    def save(self, run: Run) -> None:
        """Write ``run``'s state as it is after its latest epoch."""
        if not distributed.is_main():
            return
        previous = self.structure_file
        if prune.pruning_record(run.model) is not None:
            self.structure_file = f"structure-{run.state.epoch:04d}.safetensors"
            prune.save_structured(run.model, self.out / self.structure_file)
        save_state(self.path, {**_tree(run), "structure_file": self.structure_file})
        dense = run.state.report.get("dense", {})
        timing = {"epoch": run.state.epoch, "wall_seconds": run.state.wall_seconds} | {k: dense[k] for k in _TIMED if k in dense}
        atomic_write_text(self.out / TIMING, json.dumps(timing) + "\n")
        if previous and previous != self.structure_file:
            (self.out / previous).unlink(missing_ok=True)

    def restore(self, run: Run) -> None:
        """Load the checkpoint into ``run``, freshly built from the same config.

        The RNG state goes into ``run.state.rng``; :meth:`Run.execute` continues from it.
        """
        tree = load_state(self.path)
        try:
            self.structure_file = tree.get("structure_file")
            if distributed.is_main():
                tidy(self.out, keep_structure=self.structure_file)
            if self.structure_file:
                prune.load_structured(self.out / self.structure_file, run.model)  # in place
                run.rebuild_optimizer()  # for the reshaped parameters; its state is loaded below
            run.model.load_state_dict(tree["model"])
            if run.pruner is not None:
                run.pruner.load_state_dict(tree["pruner"])
            if run.schedule is not None:
                _load_schedule(run, tree["schedule"], int(tree["epoch"]))
            run.optimizer.load_state_dict(tree["optimizer"])
            run.state = RunState(
                int(tree["epoch"]), list(tree["history"]), json.loads(tree["report"]), float(tree.get("wall_seconds", 0.0)), tree["rng"]
            )
            timing = self._timing()
            run.state.wall_seconds = float(timing.get("wall_seconds", run.state.wall_seconds))
            if "dense" in run.state.report:
                run.state.report["dense"] |= {k: timing[k] for k in _TIMED if k in timing}
                if any(k not in run.state.report["dense"] for k in _TIMED):  # timing.json lost: measure again
                    run.state.report["dense"] |= self._dense_timing(run)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise SecateursError(f"--resume: {str(self.path)!r} does not match this run's config ({type(exc).__name__}: {exc})") from None

    def _dense_timing(self, run: Run) -> dict[str, Any]:
        """The timings of the dense model, measured again on the model ``dense.safetensors`` holds."""
        from safetensors.torch import load_file

        from secateurs import measure
        from secateurs.experiment.models import build_model

        with torch.random.fork_rng(devices=[]):
            model = build_model(run.cfg.model.name, input_shape=run.data.input_shape, num_classes=run.data.num_classes)
        model.load_state_dict(load_file(str(self.out / "dense.safetensors")))
        return {"latency_ms": measure.measure_latency(model.to(run.device), run.example, runs=30)}

    def _timing(self) -> dict[str, Any]:
        try:
            timing = json.loads((self.out / TIMING).read_text())
        except (OSError, ValueError):
            return {}
        return timing if isinstance(timing, dict) else {}

    def discard_structure(self) -> None:
        """Remove the side file of shapes once the final model is written."""
        if self.structure_file and distributed.is_main():
            (self.out / self.structure_file).unlink(missing_ok=True)


def _tree(run: Run) -> dict[str, Any]:
    return {
        "epoch": run.state.epoch,
        "history": run.state.history,
        "report": json.dumps(_untimed(run.state.report)),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),  # includes the clip rule's state and log
        "pruner": run.pruner.state_dict() if run.pruner is not None else None,
        "schedule": run.schedule.state_dict() if run.schedule is not None else None,
        "rng": torch.get_rng_state(),
    }


def _untimed(report: dict[str, Any]) -> dict[str, Any]:
    """The report so far without its timings (they go to :data:`TIMING`)."""
    if "dense" not in report:
        return report
    return {**report, "dense": {k: v for k, v in report["dense"].items() if k not in _TIMED}}


def _load_schedule(run: Run, state: Any, epoch: int) -> None:
    assert run.schedule is not None
    if state is None and run.pruner is None:
        # a structured run checkpointed before its rounds had a schedule: one tick per prune epoch
        run.schedule.tick = sum(run.plan.phase_at(e)[0].name == "prune" for e in range(epoch))
        return
    run.schedule.load_state_dict(state)
