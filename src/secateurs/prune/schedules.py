"""When to prune and to what sparsity, shaped like learning-rate schedulers.

A schedule counts ticks; the caller decides whether a tick is an epoch or a batch. Each
``step()`` first prunes if the current tick is a pruning tick, then advances::

    schedule = AGP(pruner, start=0, end=8, frequency=2)
    for epoch in range(schedule.length):
        if schedule.prunes_next() and pruner.requires_data:
            pruner.score(batches, loss_fn)
        schedule.step()
        train_one_epoch()

Targets are absolute: each pruning step asks the pruner for "this fraction of the targeted
weights", never "this fraction of what is left", so nothing compounds by accident.

A schedule drives any :class:`Prunable`: an object with a final ``sparsity`` and a
``step(sparsity) -> float`` that prunes to that absolute target. A
:class:`~secateurs.prune.Pruner` is one; ``secateurs run`` drives structured channel removal
through a small adapter of the same shape. Pass a Pruner when the schedule should also look
after scoring (``prunes_next()`` then ``pruner.score(...)``) or when wrapping it in
:class:`Rewind`, which resets the pruner's model.

===========  ==================================================================================
``oneshot``  prune once to the final sparsity at tick ``at``
``iterative`` ``rounds`` prunes ``finetune_epochs`` ticks apart, each removing the same fraction of
             the remaining weights (Han et al. 2015; Frankle & Carbin 2019), or linear steps
``agp``      Zhu & Gupta 2017: ``s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t_end - t0))**3`` every
             ``frequency`` ticks from ``start`` to ``end``
===========  ==================================================================================

:class:`Rewind` wraps any of them for lottery-ticket training: after every prune the weights go
back to their values at tick ``at`` (0: the initialisation) and the masks are re-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from secateurs.errors import SecateursError, check, check_choice, check_int
from secateurs.prune.pruner import Pruner, check_sparsity

__all__ = ["AGP", "SCHEDULES", "Iterative", "OneShot", "Prunable", "Rewind", "Schedule", "make_schedule"]


@runtime_checkable
class Prunable(Protocol):
    """What a schedule drives: a final ``sparsity`` and ``step(sparsity)``, which prunes to that
    absolute target and returns the sparsity reached. An optional ``current_sparsity`` is the
    schedule's starting point (0 without one)."""

    sparsity: float

    def step(self, sparsity: float) -> float:
        """Prune so that ``sparsity`` is reached; return what was reached."""
        ...


class Schedule:
    """Base class: subclasses say at which ticks to prune (:meth:`sparsity_at`) and how long the
    schedule lasts (:attr:`length`, fine-tuning after the last prune included).

    ``pruner`` is any :class:`Prunable` (a :class:`~secateurs.prune.Pruner` is one).
    """

    name: ClassVar[str] = ""
    by_threshold: ClassVar[bool] = False
    """Whether the schedule can drive a pruner that prunes below a threshold (no sparsity)."""

    def __init__(self, pruner: Prunable, *, sparsity: float | None = None):
        check(
            isinstance(pruner, Prunable), "pruner", type(pruner).__name__,
            "a secateurs.prune.Pruner, or an object with a final sparsity and step(sparsity)",
        )
        self.pruner = pruner
        threshold = getattr(pruner, "threshold", None)
        below = sparsity is None and pruner.sparsity is None and threshold is not None
        if below:
            check(self.by_threshold, "pruner", f"a Pruner with threshold={threshold}",
                  f"a Pruner with a sparsity ({self.name} ramps a sparsity up; a threshold prunes once: use OneShot)")
        self.final_sparsity: float | None = None if below else check_sparsity(pruner.sparsity if sparsity is None else sparsity)
        """The sparsity of the last prune (None for a pruner that prunes below a threshold)."""
        self.tick = 0
        self.sparsity: float = getattr(pruner, "current_sparsity", 0.0)
        """The target of the latest prune (the current sparsity before any)."""

    def sparsity_at(self, tick: int) -> float | None:
        """Target sparsity if ``tick`` is a pruning tick, else None."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        raise NotImplementedError

    @property
    def last_prune(self) -> int:
        """The last pruning tick."""
        raise NotImplementedError

    def prunes_next(self) -> bool:
        """Whether the next :meth:`step` prunes (score a data criterion before it)."""
        return self.sparsity_at(self.tick) is not None

    @property
    def done(self) -> bool:
        """True once all :attr:`length` ticks have been stepped."""
        return self.tick >= self.length

    def step(self) -> bool:
        """Prune if this tick is due, then advance one tick; returns whether it pruned."""
        target = self.sparsity_at(self.tick)
        if target is not None:
            self.pruner.step(target)
            self.sparsity = target
        self.tick += 1
        return target is not None

    def options(self) -> dict[str, Any]:
        return {"sparsity": self.final_sparsity}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tick": self.tick, "sparsity": self.sparsity, "options": self.options()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise SecateursError(f"schedule state: got {state.get('name')!r}; allowed: state saved by {self.name!r}")
        self.tick = int(state["tick"])
        self.sparsity = float(state["sparsity"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args}, tick={self.tick})"


class OneShot(Schedule):
    """Prune once, at tick ``at``, to the pruner's sparsity (or below its threshold).

    >>> from torch import nn
    >>> schedule = OneShot(Pruner(nn.Linear(10, 10), sparsity=0.5))
    >>> schedule.prunes_next(), schedule.step(), schedule.sparsity, schedule.done
    (True, True, 0.5, True)
    """

    name = "oneshot"
    by_threshold = True

    def __init__(self, pruner: Prunable, *, at: int = 0, sparsity: float | None = None):
        super().__init__(pruner, sparsity=sparsity)
        self.at = check_int(at, "at", minimum=0)

    def sparsity_at(self, tick: int) -> float | None:
        return self.final_sparsity if tick == self.at else None

    def prunes_next(self) -> bool:
        return self.tick == self.at

    def step(self) -> bool:
        if self.final_sparsity is not None or self.tick != self.at:
            return super().step()
        self.sparsity = self.pruner.step(None)  # below the pruner's threshold: what it reached
        self.tick += 1
        return True

    @property
    def length(self) -> int:
        return self.at + 1

    @property
    def last_prune(self) -> int:
        return self.at

    def options(self) -> dict[str, Any]:
        return super().options() | {"at": self.at}


class Iterative(Schedule):
    """``rounds`` prunes, ``finetune_epochs`` ticks apart, starting at tick ``start``.

    With ``spacing="geometric"`` (default) every round removes the same fraction of the weights
    still there, so round ``r`` of ``R`` reaches ``1 - (1 - s)**(r / R)``; ``"linear"`` reaches
    ``s * r / R``.

    ``secateurs run`` removes channels on a linear iterative schedule (``structured``), and
    prunes weights on one with ``prune.schedule = "iterative"``.

    >>> from torch import nn
    >>> schedule = Iterative(Pruner(nn.Linear(10, 10), sparsity=0.75), rounds=2, finetune_epochs=3)
    >>> [schedule.sparsity_at(t) for t in range(schedule.length)]
    [0.5, None, None, 0.75, None, None]
    """

    name = "iterative"
    SPACINGS: ClassVar[tuple[str, ...]] = ("geometric", "linear")

    def __init__(
        self,
        pruner: Prunable,
        *,
        rounds: int,
        finetune_epochs: int,
        start: int = 0,
        spacing: str = "geometric",
        sparsity: float | None = None,
    ):
        super().__init__(pruner, sparsity=sparsity)
        self.rounds = check_int(rounds, "rounds", minimum=1)
        self.finetune_epochs = check_int(finetune_epochs, "finetune_epochs", minimum=1)
        self.start = check_int(start, "start", minimum=0)
        self.spacing = check_choice(spacing, "spacing", self.SPACINGS)

    def sparsity_at(self, tick: int) -> float | None:
        offset = tick - self.start
        if offset < 0 or offset % self.finetune_epochs or offset // self.finetune_epochs >= self.rounds:
            return None
        done = offset // self.finetune_epochs + 1  # rounds completed after this one
        if self.spacing == "linear":
            return self.final_sparsity * done / self.rounds
        return 1.0 - (1.0 - self.final_sparsity) ** (done / self.rounds)

    @property
    def length(self) -> int:
        return self.start + self.rounds * self.finetune_epochs

    @property
    def last_prune(self) -> int:
        return self.start + (self.rounds - 1) * self.finetune_epochs

    def options(self) -> dict[str, Any]:
        return super().options() | {
            "rounds": self.rounds,
            "finetune_epochs": self.finetune_epochs,
            "start": self.start,
            "spacing": self.spacing,
        }


class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta 2017): cubic ramp from ``initial`` at tick
    ``start`` to the final sparsity at tick ``end``, pruning every ``frequency`` ticks (and at
    ``end``).

    >>> from torch import nn
    >>> schedule = AGP(Pruner(nn.Linear(10, 10), sparsity=0.8), start=0, end=4, frequency=2)
    >>> [None if s is None else round(s, 3) for s in map(schedule.sparsity_at, range(schedule.length))]
    [0.0, None, 0.7, None, 0.8]
    """

    name = "agp"

    def __init__(
        self,
        pruner: Prunable,
        *,
        start: int = 0,
        end: int,
        frequency: int = 1,
        initial: float = 0.0,
        sparsity: float | None = None,
    ):
        super().__init__(pruner, sparsity=sparsity)
        self.start = check_int(start, "start", minimum=0)
        self.end = check_int(end, "end", minimum=self.start)
        self.frequency = check_int(frequency, "frequency", minimum=1)
        self.initial = check_sparsity(initial, "initial")
        check(
            self.initial <= self.final_sparsity, "initial", initial,
            f"at most the final sparsity {self.final_sparsity}",
        )

    def sparsity_at(self, tick: int) -> float | None:
        if tick < self.start or tick > self.end:
            return None
        if (tick - self.start) % self.frequency and tick != self.end:
            return None
        span = self.end - self.start
        progress = 1.0 if span == 0 else (tick - self.start) / span
        return self.final_sparsity + (self.initial - self.final_sparsity) * (1.0 - progress) ** 3

    @property
    def length(self) -> int:
        return self.end + 1

    @property
    def last_prune(self) -> int:
        return self.end

    def options(self) -> dict[str, Any]:
        return super().options() | {
            "start": self.start,
            "end": self.end,
            "frequency": self.frequency,
            "initial": self.initial,
        }


class Rewind(Schedule):
    """Lottery-ticket rewinding around another schedule (Frankle & Carbin 2019; Frankle et al.
    2020 for rewinding to an early tick).

    The model's full state (weights and buffers) is copied when tick ``at`` begins (0: before
    any training, the initialisation), or taken from ``state``. After every later prune the model
    is reset to that copy and the masks are re-applied, so the surviving weights restart from
    their early values. :attr:`rewound` tells the caller to reset its optimizer and LR schedule.
    """

    name = "rewind"

    def __init__(self, schedule: Schedule, *, at: int = 0, state: Mapping[str, torch.Tensor] | None = None):
        ok = isinstance(schedule, Schedule) and not isinstance(schedule, Rewind)
        check(ok, "schedule", type(schedule).__name__, "OneShot, Iterative or AGP")
        check(
            isinstance(schedule.pruner, Pruner), "schedule", type(schedule.pruner).__name__,
            "a schedule of a secateurs.prune.Pruner (rewinding resets its model and masks)",
        )
        self.inner = schedule
        self.pruner: Pruner = schedule.pruner
        self.at = check_int(at, "at", minimum=0)
        self.snapshot: dict[str, torch.Tensor] | None = (
            None if state is None else {k: v.detach().clone() for k, v in state.items()}
        )
        self.rewound = False

    @property
    def tick(self) -> int:  # type: ignore[override]
        return self.inner.tick

    @property
    def sparsity(self) -> float:  # type: ignore[override]
        return self.inner.sparsity

    @property
    def final_sparsity(self) -> float:  # type: ignore[override]
        return self.inner.final_sparsity

    def sparsity_at(self, tick: int) -> float | None:
        return self.inner.sparsity_at(tick)

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def last_prune(self) -> int:
        return self.inner.last_prune

    @torch.no_grad()
    def step(self) -> bool:
        tick = self.inner.tick
        if self.snapshot is None and tick >= self.at:
            self.snapshot = {k: v.detach().clone() for k, v in self.pruner.model.state_dict().items()}
        pruned = self.inner.step()
        self.rewound = False
        if pruned and tick > self.at and self.snapshot is not None:
            self.pruner.model.load_state_dict(self.snapshot)
            self.pruner.apply_()
            self.rewound = True
        return pruned

    def options(self) -> dict[str, Any]:
        return {"at": self.at, "inner": self.inner.name}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "at": self.at,
            "inner": self.inner.state_dict(),
            "snapshot": self.snapshot,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise SecateursError(f"schedule state: got {state.get('name')!r}; allowed: state saved by 'rewind'")
        self.inner.load_state_dict(state["inner"])
        snapshot = state.get("snapshot")
        self.snapshot = None if snapshot is None else {k: v.clone() for k, v in snapshot.items()}


_SCHEDULES: dict[str, type[Schedule]] = {"oneshot": OneShot, "iterative": Iterative, "agp": AGP}
SCHEDULES: tuple[str, ...] = tuple(_SCHEDULES)
"""Schedule names accepted by :func:`make_schedule`."""


def make_schedule(name: str, pruner: Prunable, *, rewind_at: int | None = None, **options: Any) -> Schedule:
    """A schedule by name driving ``pruner`` (any :class:`Prunable`); ``rewind_at`` wraps it
    in :class:`Rewind` (``pruner`` must then be a :class:`~secateurs.prune.Pruner`).

    >>> from torch import nn
    >>> make_schedule("agp", Pruner(nn.Linear(4, 4), sparsity=0.5), end=10, frequency=2)
    AGP(sparsity=0.5, start=0, end=10, frequency=2, initial=0.0, tick=0)
    """
    check_choice(name, "schedule", SCHEDULES)
    if rewind_at is not None:
        check_int(rewind_at, "rewind_at", minimum=0)
    try:
        schedule = _SCHEDULES[name](pruner, **options)
    except TypeError as exc:
        raise SecateursError(f"schedule options: got {sorted(options)} for {name!r}; {exc}") from None
    return schedule if rewind_at is None else Rewind(schedule, at=rewind_at)
