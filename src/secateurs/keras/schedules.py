"""Pruning schedules as Keras callbacks, with the step semantics of TFMOT's.

A step is a training batch. The schedule's position is the wrapped optimizer's ``prune_step``
(the number of batches it has seen, an optimizer variable: saved with the model, so a loaded
model resumes where it stopped). Before each batch the callback asks
:meth:`PruningSchedule.sparsity_at` about the batch's step; when it answers, the weights are
scored, the masks re-selected and applied, and the optimizer keeps them applied after every
update. The step of a batch is the number of batches seen before it, except for TFMOT's two
schedules: TFMOT 0.8's ``PruneLowMagnitude.call`` increments ``pruning_step`` (0 after
``UpdatePruningStep.on_train_begin``) before its mask update, so the first batch is step 1,
batch ``b`` step ``b + 1``; ``PolynomialDecay`` and ``ConstantSparsity`` count the same way
(:attr:`PruningSchedule.first_step`), so they prune on the batches TFMOT prunes on.

==================  ===========================================================================
``PolynomialDecay``  TFMOT's: from ``begin_step`` every ``frequency`` steps to ``end_step``,
                    ``s = s_f + (s_i - s_f) * (1 - p)**power``, ``p = (step - begin) / (end - begin)``
``ConstantSparsity`` TFMOT's: ``target_sparsity`` every ``frequency`` steps from ``begin_step``
``OneShot``         prune once, at ``step``
``Iterative``       ``rounds`` prunes ``every`` steps apart from ``begin_step``, each removing
                    the same fraction of what is left
==================  ===========================================================================

Porting from TFMOT: drop ``prune_low_magnitude`` and ``UpdatePruningStep``; wrap the
optimizer and pass the schedule as a callback::

    model.compile(optimizer=sk.wrap(keras.optimizers.Adam()), loss=...)
    model.fit(x, y, callbacks=[sk.PolynomialDecay(initial_sparsity=0.5, final_sparsity=0.9,
                                                  begin_step=0, end_step=1000)])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from secateurs.errors import check, check_fraction, check_int
from secateurs.keras._model import sync, wrapped_optimizer
from secateurs.keras.criteria import build_criterion
from secateurs.keras.layers import Target, prunable_targets
from secateurs.keras.selection import parse_pattern, select

__all__ = ["ConstantSparsity", "Iterative", "OneShot", "PolynomialDecay", "PruningSchedule", "prune_now"]


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


def apply_masks(optimizer: Any, targets: list[Target], masks: list[np.ndarray]) -> None:
    """Write ``masks`` into the optimizer's mask variables and zero the pruned weights."""
    for t, mask in zip(targets, masks, strict=True):
        optimizer.mask_of(t.variable).assign(mask.astype(np.uint8))
        t.variable.assign(_numpy(t.variable) * mask.astype(_numpy(t.variable).dtype))


def prune_now(
    model: Any,
    sparsity: float,
    *,
    criterion: Any = "magnitude",
    scope: str = "layer",
    pattern: Any = None,
    layers: Any = None,
    data: Iterable[Any] | None = None,
) -> float:
    """Prune ``model`` once, outside ``fit``; returns the sparsity of the targeted weights.

    The model must be compiled with an optimizer from :func:`~secateurs.keras.wrap` (its
    masks keep pruned weights at zero in later training).
    """
    schedule = OneShot(sparsity, criterion=criterion, scope=scope, pattern=pattern, layers=layers, data=data)
    schedule.set_model(model)
    schedule.attach()
    return schedule.prune(schedule.sparsity)


class PruningSchedule(keras.callbacks.Callback):
    """Base class: when to prune (:meth:`sparsity_at`) and how (criterion, scope, pattern).

    ``criterion``: a name of :data:`~secateurs.keras.criteria.CRITERIA` or a criterion;
    ``scope``: ``"layer"`` (each target to the sparsity) or ``"global"`` (all targets
    together); ``pattern``: ``"N:M"`` keeps N of every M weights along each kernel's input
    axis (then ``sparsity`` is ``1 - N/M``); ``layers``: layers or layer names (default:
    every prunable layer); ``data``: batches of ``(x, y)`` for the data criteria.
    """

    def __init__(
        self,
        *,
        criterion: Any = "magnitude",
        scope: str = "layer",
        pattern: Any = None,
        layers: Any = None,
        data: Iterable[Any] | None = None,
    ) -> None:
        super().__init__()
        self.criterion = build_criterion(criterion)
        check(scope in ("layer", "global"), "scope", scope, "layer, global")
        self.scope = scope
        self.pattern = parse_pattern(pattern)
        self.layers = layers
        self.data = data
        if self.criterion.needs_data:
            check(data is not None, "data", None, f"batches of (x, y) for criterion {self.criterion.name!r}")
        self.step = 0
        self.targets: list[Target] = []
        self.history: list[tuple[int, float]] = []
        """(step, sparsity reached) of every pruning step of this callback."""

    # -- the schedule ------------------------------------------------------------------------

    first_step = 0
    """The step of the first batch: 0 for secateurs' schedules, 1 for TFMOT's (see the module)."""

    def sparsity_at(self, step: int) -> float | None:
        """The target sparsity to prune to before the batch of ``step``, or None (no pruning then)."""
        raise NotImplementedError

    @property
    def final_sparsity(self) -> float:
        raise NotImplementedError

    # -- keras hooks -------------------------------------------------------------------------

    def attach(self) -> None:
        """Find the targets and give each a mask in the wrapped optimizer."""
        model = self.model
        optimizer = wrapped_optimizer(model)
        check(getattr(model, "steps_per_execution", 1) == 1, "steps_per_execution",
              getattr(model, "steps_per_execution", None), "1 with a pruning schedule")  # fmt: skip
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.targets = prunable_targets(model, self.layers)
        before = len(optimizer.masks)
        optimizer.add_masks([t.variable for t in self.targets])
        if len(optimizer.masks) != before and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)  # the step now carries the new masks
        self.step = int(_numpy(optimizer.prune_step)) + self.first_step

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.attach()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        target = self.sparsity_at(self.step)
        if target is not None:
            self.prune(target)
        self.step += 1

    def prune(self, sparsity: float) -> float:
        """Score, select and apply masks at ``sparsity`` now; returns the sparsity reached."""
        sync(self.model)
        optimizer = wrapped_optimizer(self.model)
        variables = [t.variable for t in self.targets]
        masks = [_numpy(optimizer.mask_of(v)) for v in variables]
        scores = self.criterion.scores(self.model, self.targets, self.data)
        new = select(
            scores,
            masks,
            sparsity,
            scope=self.scope,
            pattern=self.pattern,
            group_axes=[t.group_axis for t in self.targets],
            names=[t.name for t in self.targets],
        )
        apply_masks(optimizer, self.targets, new)
        kept = sum(int(m.sum()) for m in new)
        reached = 1.0 - kept / sum(m.size for m in new)
        self.history.append((self.step, reached))
        return reached


class PolynomialDecay(PruningSchedule):
    """TFMOT's ``PolynomialDecay``: the same arguments, defaults and steps (the first batch is
    step 1, as in TFMOT).

    Prunes when ``begin_step <= step <= end_step`` and ``(step - begin_step) % frequency == 0``,
    to ``final + (initial - final) * (1 - p)**power`` with
    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)``.
    """

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        final_sparsity: float = 0.9,
        begin_step: int = 0,
        end_step: int = 1000,
        power: float = 3,
        frequency: int = 100,
        **options: Any,
    ) -> None:
        self.initial_sparsity = check_fraction(initial_sparsity, "initial_sparsity")
        self.final_sparsity_ = check_fraction(final_sparsity, "final_sparsity")
        self.begin_step = check_int(begin_step, "begin_step", minimum=0)
        self.end_step = check_int(end_step, "end_step", minimum=self.begin_step + 1)
        ok = isinstance(power, int | float) and not isinstance(power, bool) and power > 0
        check(ok, "power", power, "a number > 0")
        self.power = float(power)
        self.frequency = check_int(frequency, "frequency", minimum=1)
        super().__init__(**options)

    first_step = 1

    @property
    def final_sparsity(self) -> float:
        return self.final_sparsity_

    def sparsity_at(self, step: int) -> float | None:
        if not (self.begin_step <= step <= self.end_step) or (step - self.begin_step) % self.frequency:
            return None
        p = min(1.0, max(0.0, (step - self.begin_step) / (self.end_step - self.begin_step)))
        return self.final_sparsity_ + (self.initial_sparsity - self.final_sparsity_) * (1 - p) ** self.power


class ConstantSparsity(PruningSchedule):
    """TFMOT's ``ConstantSparsity``: ``target_sparsity`` every ``frequency`` steps from
    ``begin_step`` to ``end_step`` (-1: for ever); the first batch is step 1, as in TFMOT."""

    first_step = 1

    def __init__(self, target_sparsity: float, begin_step: int = 0, end_step: int = -1, frequency: int = 100, **options: Any) -> None:
        self.target_sparsity = check_fraction(target_sparsity, "target_sparsity")
        self.begin_step = check_int(begin_step, "begin_step", minimum=0)
        self.end_step = check_int(end_step, "end_step", minimum=-1)
        self.frequency = check_int(frequency, "frequency", minimum=1)
        super().__init__(**options)

    @property
    def final_sparsity(self) -> float:
        return self.target_sparsity

    def sparsity_at(self, step: int) -> float | None:
        in_range = step >= self.begin_step and (self.end_step < 0 or step <= self.end_step)
        return self.target_sparsity if in_range and (step - self.begin_step) % self.frequency == 0 else None


class OneShot(PruningSchedule):
    """Prune once to ``sparsity``, before batch ``step`` (0: before training starts)."""

    def __init__(self, sparsity: float, step: int = 0, **options: Any) -> None:
        self.sparsity = check_fraction(sparsity, "sparsity")
        self.at = check_int(step, "step", minimum=0)
        super().__init__(**options)

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def sparsity_at(self, step: int) -> float | None:
        return self.sparsity if step == self.at else None


class Iterative(PruningSchedule):
    """``rounds`` prunes ``every`` steps apart from ``begin_step``; round r (1-based) prunes to
    ``1 - (1 - sparsity)**(r / rounds)``, the same fraction of the remaining weights each time
    (Han et al. 2015)."""

    def __init__(self, sparsity: float, rounds: int = 3, every: int = 100, begin_step: int = 0, **options: Any) -> None:
        self.sparsity = check_fraction(sparsity, "sparsity")
        self.rounds = check_int(rounds, "rounds", minimum=1)
        self.every = check_int(every, "every", minimum=1)
        self.begin_step = check_int(begin_step, "begin_step", minimum=0)
        super().__init__(**options)

    @property
    def final_sparsity(self) -> float:
        return self.sparsity

    def sparsity_at(self, step: int) -> float | None:
        offset = step - self.begin_step
        if offset < 0 or offset % self.every or offset // self.every >= self.rounds:
            return None
        r = offset // self.every + 1
        return 1.0 - (1.0 - self.sparsity) ** (r / self.rounds)
