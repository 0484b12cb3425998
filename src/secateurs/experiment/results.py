"""What a run measures and writes at its two milestones: the dense model before any pruning,
and the final model with the report (``report.json``, ``report.md``, plots).

Every rank measures; only rank 0 writes files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from safetensors.torch import save as st_save

from secateurs import prune
from secateurs.experiment import distributed, reports
from secateurs.experiment.pruning import pattern_misfits
from secateurs.experiment.train import accuracy
from secateurs.serialization import atomic_write_bytes

if TYPE_CHECKING:
    from secateurs.experiment.run import Run

__all__ = ["dense_metrics", "final_report"]


def dense_metrics(run: Run) -> dict[str, Any]:
    """Write ``dense.safetensors`` and measure the model as dense training left it: test and
    validation accuracy, parameters, file size, MACs and latency."""
    dense_bytes = st_save({k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()})
    if distributed.is_main():
        atomic_write_bytes(run.out / "dense.safetensors", dense_bytes)
    return {
        "accuracy": accuracy(run.model, run.data.test),
        "val_accuracy": accuracy(run.model, run.data.val),
        "params": sum(p.numel() for p in run.model.parameters()),
        "checkpoint_bytes": len(dense_bytes),
        **reports.cost(run.model, run.example),
    }


def final_report(run: Run, *, wall_seconds: float | Callable[[], float]) -> dict[str, Any]:
    """Make the pruning permanent, write ``model.safetensors`` (sparse or reshaped), measure it
    against ``run.state.report["dense"]`` and write the reports; ``report.json`` is written last,
    so its presence means the run is done. Returns the report.

    ``wall_seconds`` may be a function, read once the final model is measured and the plotting
    library imported, so the report's wall time covers nearly all of the run.
    """
    if run.pruner is not None:
        targets = {name: mask.numel() for name, mask in run.pruner.masks.items()}
        misfits = pattern_misfits(run.pruner)
        run.pruner.finalize()
    else:
        targets, misfits = {}, {}
    model_path = run.out / "model.safetensors"
    if distributed.is_main():
        if prune.pruning_record(run.model) is not None:
            prune.save_structured(run.model, model_path)
        else:
            prune.save(run.model, model_path)
    distributed.barrier()  # every rank reports the size of rank 0's file
    if callable(wall_seconds):
        from secateurs.experiment import plots  # noqa: F401 (its import is part of the run's time)

        wall_seconds = wall_seconds()
    report = reports.build_report(
        cfg=run.cfg,
        data=run.data,
        model=run.model,
        example=run.example,
        targets=targets,
        dense=run.state.report["dense"],
        final_accuracy=accuracy(run.model, run.data.test),
        final_val_accuracy=accuracy(run.model, run.data.val),
        checkpoint_bytes=model_path.stat().st_size,
        log=run.log,
        history=run.state.history,
        wall_seconds=wall_seconds,
        world_size=run.world_size,
        pattern_misfits=misfits,
        device=str(run.device),
    )
    if distributed.is_main():
        reports.write_all(run.out, report, run.log, run.state.history)
    return report
