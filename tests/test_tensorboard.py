"""Optional TensorBoard logging: events that match the report, and a clear error without the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import QUICK_RUN
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.errors import SecateursError
from secateurs.experiment import tensorboard

REPORT = {
    "history": [
        {"epoch": 1, "phase": "dense", "loss": 2.0, "val_accuracy": 0.5, "sparsity": 0.0},
        {"epoch": 2, "phase": "prune", "loss": 1.0, "val_accuracy": 0.75, "sparsity": 0.5},
    ],
    "dense": {"accuracy": 0.9},
    "final": {"accuracy": 0.8, "val_accuracy": 0.75, "sparsity": 0.5, "compression_ratio": 2.0, "nonzero_params": 10, "checkpoint_bytes": 100},
}


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_run_history_and_final_metrics_become_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tensorboard.write_run(tmp_path / "tb", REPORT, hparams={"criterion": "magnitude", "sparsity": 0.5})
    scalars = _scalars(tmp_path / "tb")
    assert scalars["epoch/val_accuracy"] == [(1, 0.5), (2, 0.75)]
    assert scalars["epoch/sparsity"] == [(1, 0.0), (2, 0.5)]
    assert scalars["final/accuracy"] == [(2, pytest.approx(0.8))]
    assert scalars["final/compression_ratio"] == [(2, 2.0)]


def test_without_tensorboard_asking_for_it_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert not tensorboard.available()
    with pytest.raises(SecateursError, match="needs the tensorboard package"):
        tensorboard.write_run(tmp_path, REPORT)
    result = CliRunner().invoke(app, ["sweep", "--tensorboard", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "secateurs: error: --tensorboard: needs the tensorboard package, which is not installed; "
        "allowed: pip install tensorboard, or leave --tensorboard out"
    )


@pytest.mark.slow
def test_sweep_logs_each_cell_with_its_hyperparameters(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    overrides = [*QUICK_RUN, "train.threads=1", 'sweep.criteria=["magnitude"]', "sweep.sparsities=[0.5]", "sweep.seeds=[0]"]
    args = [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, ["sweep", *args, "--tensorboard", "--quiet", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    scalars = _scalars(tmp_path / "out" / "tensorboard" / "magnitude-s0.5-seed0")
    assert len(scalars["epoch/val_accuracy"]) == 3 + 3 + 2  # dense, prune, finetune epochs
    assert "hparam/accuracy" in scalars
