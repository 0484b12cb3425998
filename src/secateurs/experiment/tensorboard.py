"""Optional TensorBoard logging of finished runs (needs the ``tensorboard`` package).

A run's report already holds everything per epoch (loss, validation accuracy, sparsity), so the
events are written from the report when a run ends: TensorBoard shows them the same as if they
had been logged live, and a run resumed after a crash logs each epoch once. A sweep also logs
each cell's hyperparameters (criterion, sparsity, seed, clipping rule) with its final metrics,
for TensorBoard's HParams tab.

Without tensorboard installed nothing is logged, unless the user asked for it (``--tensorboard``),
which is then a one-line error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secateurs.errors import SecateursError

HISTORY_SCALARS = ("loss", "val_accuracy", "sparsity")
"""Per-epoch values of ``report["history"]`` logged as ``epoch/<name>``."""


def available() -> bool:
    """Whether the tensorboard package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def require(field: str = "--tensorboard") -> None:
    """Raise a one-line :class:`SecateursError` naming ``field`` unless tensorboard is installed."""
    if not available():
        raise SecateursError(f"{field}: needs the tensorboard package, which is not installed; allowed: pip install tensorboard, or leave {field} out")


def final_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a run ends with, as ``final/<name>`` and ``dense/<name>`` scalars."""
    d, f = report["dense"], report["final"]
    return {
        "final/accuracy": float(f["accuracy"]),
        "final/val_accuracy": float(f["val_accuracy"]),
        "final/sparsity": float(f["sparsity"]),
        "final/compression_ratio": float(f["compression_ratio"]),
        "final/nonzero_params": float(f["nonzero_params"]),
        "final/checkpoint_bytes": float(f["checkpoint_bytes"]),
        "dense/accuracy": float(d["accuracy"]),
    }


def write_run(logdir: Path, report: Mapping[str, Any], *, hparams: Mapping[str, str | float | int | bool] | None = None) -> None:
    """Write the epochs and final metrics of one finished run as TensorBoard events in ``logdir``.

    ``hparams`` (name -> value) adds the run to TensorBoard's HParams tab with its final metrics.

    >>> import tempfile
    >>> report = {"history": [{"epoch": 1, "phase": "dense", "loss": 2.0, "val_accuracy": 0.5, "sparsity": 0.0}],
    ...           "dense": {"accuracy": 0.9}, "final": {"accuracy": 0.8, "val_accuracy": 0.8, "sparsity": 0.9,
    ...           "compression_ratio": 9.0, "nonzero_params": 10, "checkpoint_bytes": 100}}
    >>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
    ...     write_run(Path(d), report, hparams={"criterion": "magnitude"})
    """
    require("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    logdir.mkdir(parents=True, exist_ok=True)
    metrics = final_metrics(report)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for row in report["history"]:
            for name in HISTORY_SCALARS:
                if name in row:
                    writer.add_scalar(f"epoch/{name}", float(row[name]), global_step=int(row["epoch"]))
        last = int(report["history"][-1]["epoch"]) if report["history"] else 0
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=last)
        if hparams is not None:
            summary = {"accuracy": metrics["final/accuracy"], "compression_ratio": metrics["final/compression_ratio"], "sparsity": metrics["final/sparsity"]}
            writer.add_hparams(dict(hparams), {f"hparam/{k}": v for k, v in summary.items()}, run_name=".")
