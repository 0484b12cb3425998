"""PyTorch Lightning callbacks: secateurs clipping rules and pruning inside ``Trainer.fit``.

>>> from secateurs import clip
>>> from secateurs.integrations.lightning import GradientClipping, Pruning
>>> callbacks = [
...     Pruning(0.9, schedule="agp", schedule_options={"end": 5}),
...     GradientClipping(clip.GlobalNorm(1.0)),
... ]

and then ``lightning.Trainer(callbacks=callbacks).fit(model)``. List ``Pruning`` first: callbacks
run in list order, and it zeroes the gradients of pruned weights, so the clip norm then leaves
them out.

Both callbacks keep their whole state in Lightning's checkpoint (``state_dict`` /
``load_state_dict`` of the callback): the clip rule's running state and its log, the pruner's
bool masks and criterion statistics, and the schedule's position. ``Trainer.fit(ckpt_path=...)``
continues a run stopped halfway through pruning with the same masks. Unlike Lightning's own
``ModelPruning`` nothing wraps or reparametrises the model: its state_dict keys stay the same and
``copy.deepcopy`` works.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from os import PathLike
from typing import Any

import torch

from secateurs import clip, prune
from secateurs.errors import SecateursError, check, check_choice, check_int
from secateurs.prune.criteria import Criterion, LossFn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("secateurs.integrations.lightning needs Lightning: pip install 'secateurs[lightning]'") from exc

__all__ = ["GradientClipping", "Pruning"]


class GradientClipping(pl.Callback):
    """Clip gradients with a secateurs rule before every optimizer step, and log the norm.

    Args:
        rule: a :class:`~secateurs.clip.Rule`, or a method name from :data:`secateurs.clip.RULES`.
        **params: the rule's arguments when ``rule`` is a name (``max_norm=1.0``).

    The rule runs in ``on_before_optimizer_step``: after gradient accumulation, after AMP
    unscaling, and under DDP after the gradients were averaged over ranks, so every rank computes
    the same global norm (with FSDP2 the rule reduces the DTensor shards). Each step logs
    ``clip/grad_norm`` (before clipping) and ``clip/clipped``; :attr:`clip_log` keeps every
    step (not ``log``: Lightning sets ``callback.log`` to its own logging method).
    Use it instead of the Trainer's ``gradient_clip_val``, not with it. A non-finite norm is
    logged, not skipped.
    """

    def __init__(self, rule: clip.Rule | str, **params: Any) -> None:
        if isinstance(rule, str):
            # the method is this callback's `rule`; the rule's own arguments keep their names
            check(rule != "none", "rule", rule, "a clipping rule (leave the callback out to not clip)")
            check(rule in clip.RULES, "rule", rule, ", ".join(clip.RULES))
            rule = clip.build(rule, **params)  # type: ignore[assignment]
        else:
            check(not params, "params", sorted(params), "arguments only with a method name, not with a rule object")
        check(isinstance(rule, clip.Rule), "rule", rule, "a secateurs.clip rule or a method name")
        self.rule: clip.Rule = rule  # type: ignore[assignment]
        self.clip_log = clip.ClipLog()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        allowed = "None on the Trainer when the GradientClipping callback clips (use one of the two)"
        check(not trainer.gradient_clip_val, "gradient_clip_val", trainer.gradient_clip_val, allowed)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stats = self.rule(params)
        self.clip_log.record(stats)
        pl_module.log("clip/grad_norm", stats.norm_before.detach().float(), on_step=True, on_epoch=False)
        pl_module.log("clip/clipped", stats.clipped.float(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The rule's running state and the log (tensors and plain values)."""
        return {"rule": self.rule.state_dict(), "log": self.clip_log.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(state_dict["rule"])
        self.clip_log.load_state_dict(state_dict["log"])


class Pruning(pl.Callback):
    """Prune the LightningModule with a :class:`~secateurs.prune.Pruner` on a schedule of epochs.

    Args:
        sparsity: final fraction of the targeted weights at zero, in [0, 1).
        threshold: instead of ``sparsity``: prune every targeted weight scoring below it, once
            (only with ``schedule="oneshot"``).
        criterion: a name from :data:`secateurs.prune.CRITERIA` or a criterion object.
        schedule: ``"oneshot"``, ``"iterative"`` or ``"agp"``; one tick per training epoch.
        schedule_options: the schedule's arguments, e.g. ``{"end": 5}`` for AGP, ``{"at": 2}``
            for one-shot, ``{"rounds": 3, "finetune_epochs": 2}`` for iterative.
        pruner_options: further :class:`~secateurs.prune.Pruner` arguments (``scope``,
            ``targets``, ``exclude``, ``per_layer``, ``pattern``).
        loss_fn: ``loss_fn(outputs, targets)``, needed by data criteria (``gradient``,
            ``taylor``, ``activation``, ``movement``); before each pruning step they score the
            first ``score_batches`` batches of the training dataloader, which must yield
            ``(inputs, targets)`` pairs (under DDP the scores are all-reduced over ranks).
        score_batches: how many batches a data criterion sees before each pruning step.

    At the start of epoch ``e`` the schedule's tick ``e`` runs (pruning if it is due); the
    pruner is attached to every optimizer of the Trainer, so pruned weights, their gradients and
    optimizer state stay exactly zero. Logs ``prune/sparsity`` every epoch. After ``fit``,
    :attr:`pruner` holds the masks; :meth:`save` writes the sparse safetensors file.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        threshold: float | None = None,
        criterion: str | Criterion = "magnitude",
        schedule: str = "oneshot",
        schedule_options: Mapping[str, Any] | None = None,
        pruner_options: Mapping[str, Any] | None = None,
        loss_fn: LossFn | None = None,
        score_batches: int = 8,
    ) -> None:
        check(sparsity is not None or threshold is not None, "sparsity", sparsity, "a number in [0, 1), or threshold=... instead")
        self.sparsity = None if sparsity is None else prune.pruner.check_sparsity(sparsity)
        self.threshold = None if threshold is None else prune.pruner.check_threshold(threshold)
        check_choice(schedule, "schedule", [s for s in prune.SCHEDULES if s != "rewind"])
        if self.threshold is not None:
            check(schedule == "oneshot", "schedule", schedule, "oneshot (a threshold prunes once)")
        check_int(score_batches, "score_batches", minimum=1)
        self.criterion = prune.make_criterion(criterion) if isinstance(criterion, str) else criterion
        if self.criterion.requires_data and not callable(loss_fn):
            raise SecateursError(
                f"loss_fn: got {loss_fn!r}; allowed: a callable(outputs, targets) -> loss, which "
                f"criterion {self.criterion.name!r} needs to score batches"
            )
        self.schedule_name = schedule
        self.schedule_options = dict(schedule_options or {})
        self.pruner_options = dict(pruner_options or {})
        self.loss_fn = loss_fn
        self.score_batches = score_batches
        self.pruner: prune.Pruner | None = None
        self.schedule: prune.schedules.Schedule | None = None
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, until the pruner exists

    def _build(self, pl_module: pl.LightningModule) -> None:
        self.pruner = prune.Pruner(pl_module, sparsity=self.sparsity, threshold=self.threshold, criterion=self.criterion, **self.pruner_options)
        self.schedule = prune.schedules.make_schedule(self.schedule_name, self.pruner, **self.schedule_options)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None:
            self._build(pl_module)
        assert self.pruner is not None
        for optimizer in trainer.optimizers:
            self.pruner.attach(optimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None and self.schedule is not None
        # tick e belongs to epoch e: a run resumed from a mid-epoch checkpoint does not tick twice
        while self.schedule.tick <= trainer.current_epoch and not self.schedule.done:
            if self.schedule.prunes_next() and self.pruner.requires_data:
                self.pruner.score(islice(trainer.train_dataloader, self.score_batches), self.loss_fn)
            self.schedule.step()
        pl_module.log("prune/sparsity", self.pruner.current_sparsity, on_step=False, on_epoch=True, sync_dist=True)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.pruner is not None:
            self.pruner.mask_grads_()  # before GradientClipping's rule, when listed before it

    def save(self, path: str | PathLike[str]) -> int:
        """Write the pruned module's weights as a secateurs sparse safetensors file (read it
        back with :func:`secateurs.prune.load`); returns the file size."""
        if self.pruner is None:
            raise SecateursError("save: got a Pruning callback that has not pruned yet; allowed: call it after Trainer.fit")
        return prune.save(self.pruner.model, path)

    def state_dict(self) -> dict[str, Any]:
        """Masks and criterion statistics of the pruner, and the schedule's position."""
        if self.pruner is None or self.schedule is None:
            return dict(self._loaded or {})
        return {"pruner": self.pruner.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the pruner: keep it until then
        if self.pruner is None:
            self._loaded = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        assert self.pruner is not None and self.schedule is not None
        self.pruner.load_state_dict(state["pruner"])
        self.schedule.load_state_dict(state["schedule"])
