"""Schedules: when they prune, to what, and that targets never compound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError, config_keys
from secateurs.prune import Pruner
from secateurs.prune.schedules import AGP, SCHEDULES, Iterative, OneShot, Rewind, make_schedule


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 4))


def run(schedule) -> list[float | None]:
    """Step through the whole schedule; the pruner's sparsity after each pruning tick."""
    seen = []
    while not schedule.done:
        pruned = schedule.step()
        seen.append(schedule.pruner.current_sparsity if pruned else None)
    return seen


def test_names():
    assert SCHEDULES == ("oneshot", "iterative", "agp")


def test_oneshot_prunes_once_at_its_tick():
    schedule = OneShot(Pruner(mlp(), sparsity=0.8), at=2)
    assert [schedule.prunes_next() or schedule.step() for _ in range(2)] == [False, False]
    assert schedule.prunes_next()
    assert run(schedule) == [pytest.approx(0.8, abs=1e-3)]
    assert schedule.sparsity == 0.8 and schedule.tick == 3


def test_iterative_prunes_the_same_fraction_of_what_is_left_each_round():
    schedule = Iterative(Pruner(mlp(), sparsity=0.875), rounds=3, finetune_epochs=2)
    assert schedule.length == 6 and schedule.last_prune == 4
    reached = run(schedule)
    assert reached[1::2] == [None, None, None]
    assert reached[0::2] == [pytest.approx(0.5, abs=2e-3), pytest.approx(0.75, abs=2e-3), pytest.approx(0.875, abs=2e-3)]


def test_iterative_linear_spacing():
    schedule = Iterative(Pruner(mlp(), sparsity=0.9), rounds=3, finetune_epochs=1, spacing="linear", start=1)
    assert [schedule.sparsity_at(t) for t in range(5)] == [None, pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.9), None]


def test_agp_follows_the_cubic_formula_of_zhu_and_gupta():
    pruner = Pruner(mlp(), sparsity=0.9)
    schedule = AGP(pruner, start=2, end=12, frequency=3, initial=0.1)
    expected = {}
    for t in (2, 5, 8, 11, 12):
        expected[t] = 0.9 + (0.1 - 0.9) * (1 - (t - 2) / 10) ** 3
    for t in range(15):
        value = schedule.sparsity_at(t)
        assert (value is None) == (t not in expected), t
        if value is not None:
            assert value == pytest.approx(expected[t])
    reached = [s for s in run(schedule) if s is not None]
    assert reached == [pytest.approx(expected[t], abs=2e-3) for t in (2, 5, 8, 11, 12)]
    assert schedule.done and not schedule.prunes_next()


def test_steps_of_a_schedule_never_compound():
    pruner = Pruner(mlp(), sparsity=0.5)
    schedule = AGP(pruner, end=3)
    run(schedule)
    assert pruner.current_sparsity == pytest.approx(0.5, abs=1e-3)  # not 1 - 0.5**k


def test_prunes_next_lets_the_caller_score_a_data_criterion_first():
    model = mlp()
    pruner = Pruner(model, sparsity=0.6, criterion="gradient")
    schedule = Iterative(pruner, rounds=2, finetune_epochs=2)
    batches = [(torch.randn(8, 20), torch.randint(0, 4, (8,)))]
    while not schedule.done:
        if schedule.prunes_next() and pruner.requires_data:
            pruner.score(batches, nn.functional.cross_entropy)
        schedule.step()
    assert pruner.current_sparsity == pytest.approx(0.6, abs=1e-3)


def test_state_dict_resumes_mid_schedule():
    schedule = AGP(Pruner(mlp(), sparsity=0.8), end=6, frequency=2)
    for _ in range(3):
        schedule.step()
    state = schedule.state_dict()
    resumed = AGP(Pruner(mlp(), sparsity=0.8), end=6, frequency=2)
    resumed.load_state_dict(state)
    assert resumed.tick == 3 and resumed.sparsity == schedule.sparsity
    with pytest.raises(SecateursError, match="schedule state"):
        OneShot(Pruner(mlp(), sparsity=0.8)).load_state_dict(state)


def test_rewind_resets_surviving_weights_to_their_initial_values():
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, sparsity=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    schedule = Rewind(Iterative(pruner, rounds=2, finetune_epochs=2, start=2), at=0)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    while not schedule.done:
        pruned = schedule.step()
        if pruned:
            assert schedule.rewound
            for name, value in model.state_dict().items():
                mask = pruner.masks.get(name)
                expected = initial[name] if mask is None else initial[name] * mask
                assert torch.equal(value, expected), name
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert pruner.current_sparsity == pytest.approx(0.75, abs=1e-3)


def test_rewind_to_an_early_tick_and_to_a_given_state():
    model = mlp()
    pruner = Pruner(model, sparsity=0.5)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    schedule = Rewind(OneShot(pruner, at=1), state=state)
    schedule.step()
    schedule.step()
    assert schedule.rewound and all(float(v.abs().sum()) == 0 for v in model.state_dict().values())
    early = Rewind(OneShot(Pruner(mlp(), sparsity=0.5), at=3), at=1)
    early.step()
    assert early.snapshot is None
    early.step()
    assert early.snapshot is not None
    assert early.state_dict()["inner"]["name"] == "oneshot"


def test_make_schedule_by_name_with_rewind():
    pruner = Pruner(mlp(), sparsity=0.5)
    assert isinstance(make_schedule("oneshot", pruner), OneShot)
    schedule = make_schedule("iterative", pruner, rounds=2, finetune_epochs=1, rewind_at=0)
    assert isinstance(schedule, Rewind) and isinstance(schedule.inner, Iterative)
    with pytest.raises(SecateursError, match="schedule: got 'cosine'; allowed: oneshot, iterative, agp"):
        make_schedule("cosine", pruner)
    with pytest.raises(SecateursError, match="schedule options"):
        make_schedule("agp", pruner, end=3, bogus=1)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda p: Iterative(p, rounds=0, finetune_epochs=1), "rounds"),
        (lambda p: Iterative(p, rounds=2, finetune_epochs=0), "finetune_epochs"),
        (lambda p: Iterative(p, rounds=2, finetune_epochs=1, start=-1), "start"),
        (lambda p: Iterative(p, rounds=2, finetune_epochs=1, spacing="cubic"), "spacing"),
        (lambda p: AGP(p, start=5, end=2), "end"),
        (lambda p: AGP(p, end=4, frequency=0), "frequency"),
        (lambda p: AGP(p, end=4, initial=0.9), "initial"),
        (lambda p: OneShot(p, at=-1), "at"),
        (lambda p: OneShot(p, sparsity=1.0), "sparsity"),
        (lambda p: Rewind(OneShot(p), at=-1), "at"),
        (lambda p: make_schedule("oneshot", p, rewind_at=-1), "rewind_at"),
    ],
)
def test_bad_schedule_options_name_the_argument(factory, field):
    with pytest.raises(SecateursError, match=f"^{field}: got ") as err:
        factory(Pruner(mlp(), sparsity=0.5))
    assert err.value.field == field


def test_schedule_errors_read_as_config_keys_under_config_keys():
    with (
        pytest.raises(SecateursError, match=r"^prune\.epochs: got 0; allowed: an integer >= 1"),
        config_keys("prune.", names={"finetune_epochs": "prune.epochs"}),
    ):
        Iterative(Pruner(mlp(), sparsity=0.5), rounds=2, finetune_epochs=0)


class Recorder:
    """The least a schedule can drive: a final sparsity and step(sparsity)."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity
        self.steps: list[float] = []

    def step(self, sparsity: float) -> float:
        self.steps.append(sparsity)
        return sparsity


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_drives_any_object_with_sparsity_and_step(name):
    options = {"oneshot": {}, "iterative": {"rounds": 2, "finetune_epochs": 2}, "agp": {"end": 3}}[name]
    target = Recorder(0.75)
    schedule = make_schedule(name, target, **options)
    while not schedule.done:
        schedule.step()
    assert target.steps == [s for s in map(schedule.sparsity_at, range(schedule.length)) if s is not None]
    assert target.steps[-1] == pytest.approx(0.75) and schedule.sparsity == target.steps[-1]
    assert schedule.final_sparsity == 0.75 and schedule.state_dict()["options"]["sparsity"] == 0.75


def test_linear_iterative_targets_are_the_final_sparsity_times_rounds_done_over_rounds():
    schedule = Iterative(Recorder(0.9), rounds=3, finetune_epochs=2, spacing="linear")
    assert [schedule.sparsity_at(t) for t in (0, 2, 4)] == [0.9 * 1 / 3, 0.9 * 2 / 3, 0.9 * 3 / 3]


def test_a_schedule_refuses_an_object_it_cannot_drive():
    with pytest.raises(SecateursError, match=r"^pruner: got 'Linear'; allowed: a secateurs\.prune\.Pruner"):
        OneShot(nn.Linear(2, 2))


def test_rewind_needs_a_schedule_of_a_pruner():
    with pytest.raises(SecateursError, match=r"^schedule: got 'Recorder'"):
        Rewind(OneShot(Recorder(0.5)))
