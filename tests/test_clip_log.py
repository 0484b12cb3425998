"""ClipLog: lazy per-step records, counts, and a state dict a resumed run continues."""

from __future__ import annotations

import math

import pytest
import torch

from secateurs.clip import ClipLog, ClipStats
from secateurs.errors import SecateursError


def stats(norm: float, threshold: float, clipped: bool) -> ClipStats:
    return ClipStats(
        norm_before=torch.tensor(norm),
        norm_after=torch.tensor(min(norm, threshold)),
        threshold=torch.tensor(threshold),
        clipped=torch.tensor(clipped),
    )


def filled_log(chunk: int = 256) -> ClipLog:
    log = ClipLog(chunk=chunk)
    log.record(stats(2.0, 1.0, True), skipped=torch.tensor(False))
    log.record(stats(0.5, 1.0, False), skipped=torch.tensor(False))
    log.record(stats(math.nan, 1.0, False), skipped=torch.tensor(True))
    return log


def test_log_returns_per_step_lists_of_python_values() -> None:
    log = filled_log()
    norms = log.norms()
    assert norms[:2] == [2.0, 0.5] and math.isnan(norms[2])
    assert log.norms_after()[:2] == [1.0, 0.5]
    assert log.thresholds() == [1.0, 1.0, 1.0]
    assert log.clipped() == [True, False, False]
    assert log.skipped() == [False, False, True]


def test_log_counts_steps_clipped_and_skipped() -> None:
    log = filled_log()
    assert (log.total_steps, log.clipped_steps, log.skipped_steps) == (3, 1, 1)
    assert len(log) == 3


def test_a_skipped_step_never_counts_as_clipped() -> None:
    log = ClipLog()
    log.record(stats(math.inf, 1.0, True), skipped=torch.tensor(True))
    assert log.clipped() == [False] and log.skipped_steps == 1


def test_records_survive_chunking_and_repeated_reads() -> None:
    log = ClipLog(chunk=4)
    for i in range(10):
        log.record(stats(float(i), 5.0, i > 5))
        if i == 6:
            assert log.norms() == [float(v) for v in range(7)]
    assert log.norms() == [float(v) for v in range(10)]
    assert log.clipped_steps == 4


def test_state_dict_round_trip_continues_the_log() -> None:
    saved = filled_log().state_dict()
    log = ClipLog()
    log.load_state_dict(saved)
    log.record(stats(3.0, 1.0, True))
    assert log.total_steps == 4
    assert log.clipped() == [True, False, False, True]
    assert log.norms()[3] == 3.0


def test_state_dict_holds_one_tensor_per_column_and_also_loads_lists() -> None:
    saved = filled_log().state_dict()
    assert all(isinstance(v, torch.Tensor) and v.shape == (3,) for v in saved.values())
    log = ClipLog()
    log.load_state_dict({k: v.tolist() for k, v in saved.items()})
    assert log.skipped() == [False, False, True]


def test_load_state_dict_rejects_a_foreign_dict() -> None:
    with pytest.raises(SecateursError, match=r"^state_dict: got \['norms'\]; allowed: \["):
        ClipLog().load_state_dict({"norms": [1.0]})
