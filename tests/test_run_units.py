"""The units `secateurs run` is made of, each exercised alone on a tiny run: the epoch plan, one
epoch, the pruning tick, a structured round, the checkpoint, the final report; and that
building or executing a run leaves torch's threads and RNG as they were."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import clip
from secateurs.errors import SecateursError
from secateurs.experiment import run as runner
from secateurs.experiment.config import RunConfig, load_config
from secateurs.experiment.models import build_model
from secateurs.experiment.plan import EpochPlan, Phase
from secateurs.experiment.pruning import StructuredRounds, make_pruner, make_schedule_for
from secateurs.experiment.results import dense_metrics, final_report
from secateurs.experiment.run import Run, torch_threads
from secateurs.experiment.train import accuracy, clipped_optimizer, rebuilt_optimizer
from secateurs.prune.schedules import AGP, Iterative, OneShot

# 170 training examples, batches of 64: three steps an epoch
TINY = ["data.limit=200", "train.epochs=1", "prune.epochs=2", "prune.finetune_epochs=1"]
STRUCTURED = [*TINY, "prune.kind=structured", "prune.sparsity=0.5", "prune.rounds=2"]


def tiny(*overrides: str) -> RunConfig:
    return load_config(overrides=[*TINY, *overrides])


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- the epoch plan -------------------------------------------------------------------------


def test_plan_is_dense_then_prune_then_finetune_without_empty_phases() -> None:
    plan = EpochPlan.from_config(tiny("train.epochs=2", "prune.finetune_epochs=0"))
    assert plan.phases == (Phase("dense", 2), Phase("prune", 2))
    assert plan.total == 4
    assert [plan.phase_at(e) for e in range(4)] == [(Phase("dense", 2), 0), (Phase("dense", 2), 1), (Phase("prune", 2), 0), (Phase("prune", 2), 1)]
    with pytest.raises(IndexError):
        plan.phase_at(4)
    assert EpochPlan.from_config(tiny("prune.kind=none")).phases == (Phase("dense", 1),)


def test_plan_learning_rate_decays_by_cosine_except_while_pruning() -> None:
    plan = EpochPlan.from_config(tiny("train.epochs=4", "train.lr=0.01", "prune.finetune_epochs=2"))
    assert [plan.lr_at(e) for e in range(4)] == [0.01 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert plan.lr_at(4) == plan.lr_at(5) == 0.01 / 3
    assert plan.lr_at(6) == 0.01 / 3 and plan.lr_at(7) == pytest.approx(0.01 / 3 / 2)
    assert EpochPlan.from_config(tiny("prune.lr=0.5")).lr_at(1) == 0.5


def test_plan_seeds_differ_per_epoch_and_per_run_seed() -> None:
    plan, other = EpochPlan.from_config(tiny()), EpochPlan.from_config(tiny("seed=1"))
    assert plan.seed_at(0) == 0 and plan.seed_at(3) == 3
    assert other.seed_at(0) == 1_000_003


# --- no global side effects -------------------------------------------------------------------


def test_building_a_run_leaves_torch_threads_and_rng_as_they_were(tmp_path: Path, threads: None) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    run = Run(tiny("train.threads=1"), tmp_path, progress=False)
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng)
    assert run.pruner is not None and run.schedule is not None


def test_the_model_starts_from_the_run_seed_whatever_torchs_rng_holds(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = Run(tiny(), tmp_path, progress=False).model.state_dict()
    torch.manual_seed(2)
    b = Run(tiny(), tmp_path, progress=False).model.state_dict()
    torch.manual_seed(0)  # the run seed: what the model was always built from
    c = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def test_execute_uses_the_configured_threads_then_restores_threads_and_rng(tmp_path: Path, threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    train_epoch = runner.train_epoch

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return train_epoch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "train_epoch", recording)
    torch.set_num_threads(2)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    Run(tiny("prune.kind=none", "train.threads=1"), tmp_path, progress=False).execute()
    assert seen == [1]
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng)


def test_torch_threads_zero_leaves_torchs_setting(threads: None) -> None:
    torch.set_num_threads(2)
    with torch_threads(0):
        assert torch.get_num_threads() == 2
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


# --- one epoch --------------------------------------------------------------------------------


def test_run_epoch_trains_one_pass_at_the_plans_rate_and_records_it(tmp_path: Path) -> None:
    run = Run(tiny("train.epochs=2"), tmp_path, progress=False)
    before = [p.detach().clone() for p in run.model.parameters()]
    row = run.run_epoch()
    assert run.state.epoch == 1 and run.state.history == [row]
    assert row["epoch"] == 1 and row["phase"] == "dense" and row["sparsity"] == 0.0
    assert math.isfinite(row["loss"]) and row["val_accuracy"] == accuracy(run.model, run.data.val)
    assert run.optimizer.param_groups[0]["lr"] == run.plan.lr_at(0)
    assert run.optimizer.steps == math.ceil(len(run.data.train) / 64) == run.log.total_steps
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    assert "dense" not in run.state.report


def test_the_first_epoch_after_dense_training_measures_the_dense_model(tmp_path: Path) -> None:
    run = Run(tiny("prune.schedule=oneshot"), tmp_path, progress=False)
    run.run_epoch()
    dense_params = sum(p.numel() for p in run.model.parameters())
    row = run.run_epoch()  # the first prune epoch
    dense = run.state.report["dense"]
    assert (tmp_path / "dense.safetensors").stat().st_size == dense["checkpoint_bytes"]
    assert dense["params"] == dense_params and 0 <= dense["accuracy"] <= 1
    assert row["phase"] == "prune" and row["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_run_epoch_stops_after_the_step_where_stop_was_asked(tmp_path: Path) -> None:
    run = Run(tiny(), tmp_path, progress=False)
    with pytest.raises(runner.Interrupted):
        run.run_epoch(lambda: True)
    assert run.optimizer.steps == 1 and run.state.epoch == 0 and run.state.history == []


# --- the pruning tick -------------------------------------------------------------------------


def test_make_schedule_for_follows_the_config() -> None:
    pruner = make_pruner(tiny().prune, build_model("mlp", input_shape=(1, 8, 8), num_classes=10))
    agp = make_schedule_for(tiny("prune.epochs=5").prune, pruner)
    assert isinstance(agp, AGP) and (agp.start, agp.end, agp.frequency) == (0, 4, 1)
    it = make_schedule_for(tiny("prune.schedule=iterative", "prune.epochs=7", "prune.rounds=3").prune, pruner)
    assert isinstance(it, Iterative) and (it.rounds, it.finetune_epochs, it.spacing) == (3, 2, "geometric")
    assert isinstance(make_schedule_for(tiny("prune.schedule=oneshot").prune, pruner), OneShot)
    rounds = StructuredRounds(nn.Linear(2, 2), torch.zeros(1, 2), sparsity=0.5)
    structured = make_schedule_for(tiny("prune.kind=structured", "prune.epochs=5", "prune.rounds=5").prune, rounds)
    assert isinstance(structured, Iterative) and (structured.rounds, structured.finetune_epochs, structured.spacing) == (5, 1, "linear")


def test_config_values_the_library_refuses_are_named_by_their_config_keys() -> None:
    prune_cfg = tiny("prune.schedule=iterative", "prune.rounds=2").prune
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(SecateursError, match=r"^prune\.rounds: got 0"):
        make_schedule_for(prune_cfg.model_copy(update={"rounds": 0}), make_pruner(prune_cfg, model))
    with pytest.raises(SecateursError, match=r"^prune\.criterion: got 'nonsense'"):
        make_pruner(prune_cfg.model_copy(update={"criterion": "nonsense"}), model)


def test_prune_tick_prunes_to_the_schedules_target(tmp_path: Path) -> None:
    run = Run(tiny("train.epochs=0", "prune.epochs=3"), tmp_path, progress=False)
    assert run.pruner is not None and run.schedule is not None
    for tick in range(3):
        run._prune_tick()
        assert run.schedule.tick == tick + 1
        assert run.pruner.current_sparsity == pytest.approx(run.schedule.sparsity_at(tick), abs=1e-3)
    assert run.pruner.current_sparsity == pytest.approx(0.9, abs=1e-3)


def test_prune_tick_scores_a_data_criterion_on_the_epochs_batches(tmp_path: Path) -> None:
    run = Run(tiny("train.epochs=0", "prune.schedule=oneshot", "prune.criterion=gradient", "prune.score_batches=2"), tmp_path, progress=False)
    assert run.pruner is not None and run.pruner.requires_data
    scored: list[int] = []
    score = run.pruner.score

    def counting(batches: object, loss_fn: object) -> int:
        data = list(batches)  # type: ignore[call-overload]
        scored.append(len(data))
        return score(data, loss_fn)  # type: ignore[arg-type]

    run.pruner.score = counting  # type: ignore[method-assign]
    run._prune_tick()
    assert scored == [2]
    assert run.pruner.current_sparsity == pytest.approx(0.9, abs=1e-3)


# --- a structured round -----------------------------------------------------------------------


def test_structured_rounds_remove_channels_cumulatively_when_a_schedule_steps_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    rounds = StructuredRounds(model, torch.randn(4, 6), sparsity=0.5)
    assert not rounds.requires_data
    schedule = Iterative(rounds, rounds=2, finetune_epochs=1, spacing="linear")
    widths = []
    while not schedule.done:
        schedule.step()
        widths.append(rounds.model[0].out_features)
    assert widths == [15, 10]
    assert model[0].out_features == 20  # the original is left as it was


def test_structured_rounds_of_a_data_criterion_score_on_the_batches_given() -> None:
    torch.manual_seed(0)
    rounds = StructuredRounds(nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3)), torch.randn(4, 6), sparsity=0.5, criterion="taylor")
    assert rounds.requires_data
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    assert rounds.score(iter(data), nn.functional.cross_entropy) == 1
    assert rounds.step(0.5) == 0.5
    assert rounds.model[0].out_features == 10


def test_rebuilt_optimizer_keeps_the_clip_rule_log_steps_and_learning_rate() -> None:
    cfg = tiny().train
    rule, log = clip.build("autoclip"), clip.ClipLog()
    model = nn.Linear(4, 2)
    old = clipped_optimizer(cfg, model.parameters(), lr=0.05, rule=rule, log=log)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        old.step()
        old.zero_grad()
    clip_state = old.state_dict()["clip"]
    smaller = nn.Linear(4, 1)
    new = rebuilt_optimizer(old, cfg, smaller.parameters())
    assert new.rule is rule and new.log is log and new.steps == 3
    assert new.param_groups[0]["lr"] == 0.05 and new.param_groups[0]["params"] == list(smaller.parameters())
    assert not new.state  # the moments restart
    assert repr(new.state_dict()["clip"]) == repr(clip_state)


def test_a_structured_round_replaces_model_and_optimizer_and_keeps_the_clip_state(tmp_path: Path) -> None:
    run = Run(load_config(overrides=STRUCTURED), tmp_path, progress=False)
    run.run_epoch()  # dense
    steps, clipped = run.optimizer.steps, run.log.total_steps
    params_before = sum(p.numel() for p in run.model.parameters())
    run.run_epoch()  # the first prune epoch: round 1 of 2
    assert run.surgery is not None and run.model is run.surgery.model
    assert sum(p.numel() for p in run.model.parameters()) < params_before
    assert [p for g in run.optimizer.param_groups for p in g["params"]] == list(run.model.parameters())
    assert run.optimizer.rule is run.rule and run.optimizer.log is run.log
    assert run.optimizer.steps == 2 * steps and run.log.total_steps == 2 * clipped
    assert run.schedule is not None and run.schedule.sparsity == 0.25


# --- the checkpoint ---------------------------------------------------------------------------


def _same_state(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_state(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("overrides", [TINY, STRUCTURED], ids=["unstructured", "structured"])
def test_a_checkpoint_restores_a_fresh_run_to_the_saved_state(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides=overrides)
    run = Run(cfg, tmp_path, progress=False)
    run.run_epoch()
    run.run_epoch()
    run.save_checkpoint()
    saved_rng = torch.get_rng_state()
    again = Run(cfg, tmp_path, progress=False)
    again.restore()
    assert (again.state.epoch, again.state.history, again.state.report) == (run.state.epoch, run.state.history, run.state.report)
    assert again.state.rng is not None and torch.equal(again.state.rng, saved_rng)
    _same_state(again.model.state_dict(), run.model.state_dict())
    _same_state(again.optimizer.state_dict(), run.optimizer.state_dict())
    _same_state(again.schedule.state_dict(), run.schedule.state_dict())  # type: ignore[union-attr]
    assert [p for g in again.optimizer.param_groups for p in g["params"]] == list(again.model.parameters())


def test_a_structured_checkpoint_keeps_only_the_latest_shapes_file(tmp_path: Path) -> None:
    run = Run(load_config(overrides=[*STRUCTURED, "prune.epochs=4"]), tmp_path, progress=False)
    run.run_epoch()
    run.save_checkpoint()
    assert not list(tmp_path.glob("structure-*"))  # nothing removed yet
    run.run_epoch()
    run.save_checkpoint()
    assert [p.name for p in tmp_path.glob("structure-*")] == ["structure-0002.safetensors"]
    run.run_epoch()
    run.run_epoch()
    run.save_checkpoint()
    assert [p.name for p in tmp_path.glob("structure-*")] == ["structure-0004.safetensors"]
    run.checkpoint.discard_structure()
    assert not list(tmp_path.glob("structure-*"))


def test_a_restore_removes_what_a_kill_left_but_the_shapes_file_its_checkpoint_names(tmp_path: Path) -> None:
    run = Run(load_config(overrides=STRUCTURED), tmp_path, progress=False)
    for _ in range(2):
        run.run_epoch()
    run.save_checkpoint()  # names structure-0002
    (tmp_path / "structure-0003.safetensors").write_bytes((tmp_path / "structure-0002.safetensors").read_bytes())  # written, its checkpoint not
    (tmp_path / "structure-0001.safetensors").write_bytes(b"")  # older, not yet removed
    (tmp_path / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"half")  # an interrupted write
    again = Run(load_config(overrides=STRUCTURED), tmp_path, progress=False)
    again.restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "dense.safetensors", "structure-0002.safetensors", "timing.json"]
    _same_state(again.model.state_dict(), run.model.state_dict())


def test_a_lost_timing_file_is_measured_again_from_the_dense_weights(tmp_path: Path) -> None:
    cfg = tiny()
    run = Run(cfg, tmp_path, progress=False)
    run.run_epoch()
    run.run_epoch()  # the first prune epoch measures the dense model
    run.save_checkpoint()
    (tmp_path / "timing.json").unlink()
    again = Run(cfg, tmp_path, progress=False)
    again.restore()
    dense, want = again.state.report["dense"], run.state.report["dense"]
    assert {k: v for k, v in dense.items() if k != "latency_ms"} == {k: v for k, v in want.items() if k != "latency_ms"}
    assert math.isfinite(dense["latency_ms"]) and dense["latency_ms"] > 0


def test_a_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    run = Run(tiny(), tmp_path, progress=False)
    run.run_epoch()
    run.save_checkpoint()
    with pytest.raises(SecateursError, match="does not match this run's config"):
        Run(tiny("model.name=mlp"), tmp_path, progress=False).restore()


# --- the final report -------------------------------------------------------------------------


def test_final_report_makes_pruning_permanent_and_writes_model_and_reports(tmp_path: Path) -> None:
    run = Run(tiny("train.epochs=0", "prune.epochs=1", "prune.finetune_epochs=0"), tmp_path, progress=False)
    run.state.report["dense"] = dense_metrics(run)
    run.run_epoch()
    report = final_report(run, wall_seconds=1.5)
    assert report["wall_seconds"] == 1.5
    assert report["final"]["accuracy"] == accuracy(run.model, run.data.test)
    assert report["final"]["checkpoint_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert report["final"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert json.loads((tmp_path / "report.json").read_text())["final"] == report["final"]
    assert (tmp_path / "report.md").is_file()
