"""``secateurs run``: train dense, prune on a schedule, fine-tune, evaluate, report.

A run is a sequence of epochs in three phases (dense, prune, finetune). After every epoch the
whole state (model, optimizer, pruner and schedule, clip rule and log, history, RNG) is written
atomically to ``checkpoint.safetensors``, so ``secateurs run --resume DIR`` continues a run that
was killed at any moment and ends with the same weights and report, bit for bit on CPU.

Under ``torchrun --nproc-per-node N`` every rank runs this same loop on its shard of each
epoch's batches (``data.batch_size`` stays the global batch, split evenly over the ranks) with
the model in DDP; see :mod:`~secateurs.experiment.distributed`. Every rank evaluates the whole
validation and test splits, checks after each pruning step that all ranks hold the same masks,
and reads the same checkpoint on resume; only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from secateurs import clip, prune
from secateurs.errors import SecateursError
from secateurs.experiment import distributed, reports
from secateurs.experiment.config import RunConfig, to_toml
from secateurs.experiment.data import Dataset, batches, load_dataset
from secateurs.experiment.models import build_model
from secateurs.experiment.train import accuracy, cross_entropy, make_optimizer, train_epoch
from secateurs.serialization import atomic_write_bytes, atomic_write_text, load_state, save_state

CHECKPOINT = "checkpoint.safetensors"


class Interrupted(Exception):
    """Ctrl-C arrived; the run stopped after a whole step and can be resumed."""


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int


@dataclass
class RunState:
    """What a checkpoint holds beyond the tensors of model, optimizer and rules."""

    epoch: int = 0  # epochs completed, over all phases
    history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0


def phases(cfg: RunConfig) -> list[Phase]:
    """Dense training, the pruning schedule, then fine-tuning."""
    out = [Phase("dense", cfg.train.epochs)]
    if cfg.prune.kind != "none":
        out += [Phase("prune", cfg.prune.epochs), Phase("finetune", cfg.prune.finetune_epochs)]
    return [p for p in out if p.epochs > 0]


def _phase_at(plan: list[Phase], epoch: int) -> tuple[Phase, int]:
    start = 0
    for phase in plan:
        if epoch < start + phase.epochs:
            return phase, epoch - start
        start += phase.epochs
    raise IndexError(epoch)


def _epoch_seed(cfg: RunConfig, epoch: int) -> int:
    return cfg.seed * 1_000_003 + epoch


def _checked_world_size(cfg: RunConfig) -> int:
    """The number of ranks, which must divide the batch size (the global batch)."""
    world = distributed.world_size()
    if cfg.data.batch_size % world:
        raise SecateursError(
            f"data.batch_size: got {cfg.data.batch_size}; allowed: a multiple of the world size "
            f"{world} (it is the global batch, split evenly over the ranks)"
        )
    return world


@contextmanager
def _stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C into a flag the loop reads after each step (main thread only)."""
    flag = {"stop": False}

    def handler(signum: int, frame: object) -> None:
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield lambda: False
        return
    try:
        yield lambda: flag["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


class Run:
    """One configured run writing into ``out``. Use :meth:`execute`."""

    def __init__(self, cfg: RunConfig, out: Path, *, progress: bool = True):
        self._constructed = time.perf_counter()
        self.cfg = cfg
        self.out = out
        self.progress = progress and distributed.is_main()
        self.plan = phases(cfg)
        self.world_size = _checked_world_size(cfg)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data: Dataset = load_dataset(cfg.data)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model.name, input_shape=self.data.input_shape, num_classes=self.data.num_classes)
        self.example = self.data.val.x[:32]
        self.rule = clip.build(cfg.clip.method, **cfg.clip.params())
        self.log = clip.ClipLog()
        self.pruner: prune.Pruner | None = None
        self.schedule: Any = None
        self.structure_file: str | None = None  # structured runs: the shapes the model has now
        if cfg.prune.kind == "unstructured":
            self.pruner = prune.Pruner(
                self.model,
                sparsity=cfg.prune.sparsity,
                criterion=cfg.prune.criterion,
                scope=cfg.prune.scope,
                exclude=tuple(cfg.prune.exclude),
                per_layer=dict(cfg.prune.per_layer) or None,
                pattern=cfg.prune.pattern or None,
            )
            self.schedule = self._make_schedule(self.pruner)
        self.optimizer = self._make_optimizer(cfg.train.lr)
        self.state = RunState()
        self._ddp: torch.nn.Module | None = None  # self.model in DDP; rebuilt when the model changes

    # --- construction -------------------------------------------------------------------------

    def _make_schedule(self, pruner: prune.Pruner) -> Any:
        p = self.cfg.prune
        if p.schedule == "oneshot":
            return prune.schedules.OneShot(pruner)
        if p.schedule == "iterative":
            return prune.schedules.Iterative(pruner, rounds=p.rounds, finetune_epochs=max(p.epochs // p.rounds, 1))
        return prune.schedules.AGP(pruner, start=0, end=max(p.epochs - 1, 0), frequency=1)

    def _structured_round(self) -> int | None:
        """The structured pruning round due at this prune-phase epoch, if any."""
        p = self.cfg.prune
        phase, local = _phase_at(self.plan, self.state.epoch)
        every = max(p.epochs // p.rounds, 1)
        if phase.name != "prune" or local % every or local // every >= p.rounds:
            return None
        return local // every

    def _structured_tick(self) -> None:
        """Remove the next cumulative fraction of channels, then restart the optimizer on the smaller model."""
        r = self._structured_round()
        if r is None:
            return
        p = self.cfg.prune
        data = None
        if p.criterion in ("taylor", "gradient", "activation"):
            # unsharded: every rank scores the same batches, so every rank removes the same channels
            seed = _epoch_seed(self.cfg, self.state.epoch)
            data = list(islice(batches(self.data.train, self.cfg.data.batch_size, seed=seed), p.score_batches))
        self.model = prune.structured(
            self.model, self.example, ratio=p.sparsity * (r + 1) / p.rounds, criterion=p.criterion,
            scope=p.scope, ignore=tuple(p.exclude), batches=data, loss_fn=cross_entropy,
        )
        lr = self.optimizer.param_groups[0]["lr"]
        state = self.optimizer.state_dict()["clip"]  # the clip rule and log carry on; moments restart
        self.optimizer = self._make_optimizer(lr)
        self.optimizer.load_state_dict({**self.optimizer.state_dict(), "clip": state})
        self._ddp = None
        if self.world_size > 1:
            shapes = {name: torch.tensor(p.shape) for name, p in self.model.named_parameters()}
            distributed.check_same_on_every_rank(f"structured round {r + 1}: layer shapes", distributed.checksum(shapes))

    def _make_optimizer(self, lr: float) -> clip.ClippedOptimizer:
        t = self.cfg.train
        inner = make_optimizer(t.optimizer, self.model.parameters(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
        optimizer = clip.wrap(inner, self.rule, nonfinite=t.nonfinite, log=self.log)
        if self.pruner is not None:
            self.pruner.attach(optimizer)  # the wrapper: pruned gradients are zero before the rule's norm
        return optimizer

    def _epoch_lr(self, phase: Phase, local_epoch: int) -> float:
        """Cosine decay within dense training and fine-tuning; constant while the schedule prunes."""
        base = self.cfg.train.lr if phase.name == "dense" else (self.cfg.prune.lr or self.cfg.train.lr / 3)
        if phase.name == "prune":
            return base
        return base * 0.5 * (1 + math.cos(math.pi * local_epoch / phase.epochs))

    def _batches(self, seed: int, **kwargs: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the epoch's training batches (all of them in one process)."""
        return batches(
            self.data.train, self.cfg.data.batch_size // self.world_size, seed=seed,
            rank=distributed.rank(), world_size=self.world_size, **kwargs,
        )

    def _trained_model(self) -> torch.nn.Module:
        """The model as the training loop runs it: in DDP under torchrun, so gradients are
        averaged over ranks before the clip rule sees them."""
        if self._ddp is None:
            self._ddp = distributed.wrap_ddp(self.model)
        return self._ddp

    # --- checkpointing -------------------------------------------------------------------------

    def _checkpoint_tree(self) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "history": self.state.history,
            "report": json.dumps(self.state.report),
            "wall_seconds": self.state.wall_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # includes the clip rule's state and log
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> None:
        """Write the epoch's state atomically; a structurally pruned model's shapes go in a side
        file named by epoch, written first, so the checkpoint never points at a newer shape.
        Rank 0 writes; every rank resumes from that one file."""
        if not distributed.is_main():
            return
        previous = self.structure_file
        if prune.pruning_record(self.model) is not None:
            self.structure_file = f"structure-{self.state.epoch:04d}.safetensors"
            prune.save_structured(self.model, self.out / self.structure_file)
        save_state(self.out / CHECKPOINT, {**self._checkpoint_tree(), "structure_file": self.structure_file})
        if previous and previous != self.structure_file:
            (self.out / previous).unlink(missing_ok=True)

    def restore(self) -> None:
        """Load ``checkpoint.safetensors`` from ``out`` into this freshly built run."""
        tree = load_state(self.out / CHECKPOINT)
        try:
            self.structure_file = tree.get("structure_file")
            if self.structure_file:
                prune.load_structured(self.out / self.structure_file, self.model)
                self.optimizer = self._make_optimizer(self.cfg.train.lr)
            self.model.load_state_dict(tree["model"])
            if self.pruner is not None:
                self.pruner.load_state_dict(tree["pruner"])
            if self.schedule is not None:
                self.schedule.load_state_dict(tree["schedule"])
            self.optimizer.load_state_dict(tree["optimizer"])
            torch.set_rng_state(tree["rng"])
            self.state = RunState(int(tree["epoch"]), list(tree["history"]), json.loads(tree["report"]), float(tree["wall_seconds"]))
            self._ddp = None
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise SecateursError(f"--resume: {str(self.out / CHECKPOINT)!r} does not match this run's config ({type(exc).__name__}: {exc})") from None

    # --- the loop ------------------------------------------------------------------------------

    def _sparsity(self) -> float:
        return self.pruner.current_sparsity if self.pruner is not None else 0.0

    def _prune_tick(self) -> None:
        assert self.schedule is not None and self.pruner is not None
        if self.schedule.prunes_next() and self.pruner.requires_data:
            n = self.cfg.prune.score_batches
            data = islice(self._batches(_epoch_seed(self.cfg, self.state.epoch)), n)
            self.pruner.score(data, cross_entropy)  # all-reduced over ranks under torchrun
        self.schedule.step()
        if self.world_size > 1:
            where = f"masks after the pruning step of epoch {self.state.epoch + 1}"
            distributed.check_same_on_every_rank(where, distributed.checksum(self.pruner.masks))

    def _dense_metrics(self) -> dict[str, Any]:
        dense_bytes = st_save({k: v.contiguous() for k, v in self.model.state_dict().items()})
        if distributed.is_main():
            atomic_write_bytes(self.out / "dense.safetensors", dense_bytes)
        return {
            "accuracy": accuracy(self.model, self.data.test),
            "val_accuracy": accuracy(self.model, self.data.val),
            "params": sum(p.numel() for p in self.model.parameters()),
            "checkpoint_bytes": len(dense_bytes),
            **reports.cost(self.model, self.example),
        }

    def execute(self, *, resume: bool = False) -> dict[str, Any]:
        """Run (or continue) every epoch, then write the final model and the reports."""
        if resume:
            self.restore()
        total_epochs = sum(p.epochs for p in self.plan)
        started = self._constructed  # data loading and model building count too
        with _stop_on_sigint() as should_stop, reports.progress_bars(self.progress) as bars:
            bar = None
            while self.state.epoch < total_epochs:
                phase, local = _phase_at(self.plan, self.state.epoch)
                if bar is None or bar.phase != phase.name:
                    bar = bars.phase(phase.name, phase.epochs, completed=local)
                for group in self.optimizer.param_groups:
                    group["lr"] = self._epoch_lr(phase, local)
                if phase.name != "dense" and "dense" not in self.state.report:
                    self.state.report["dense"] = self._dense_metrics()
                torch.manual_seed(_epoch_seed(self.cfg, self.state.epoch))
                if phase.name == "prune" and self.schedule is not None:
                    self._prune_tick()
                elif phase.name == "prune" and self.cfg.prune.kind == "structured":
                    self._structured_tick()
                data = self._batches(_epoch_seed(self.cfg, self.state.epoch), augment=self.cfg.data.augment)

                def after_step() -> None:
                    if distributed.any_rank(should_stop()):  # every rank stops after the same step
                        raise Interrupted

                try:
                    loss = distributed.all_mean(train_epoch(self._trained_model(), self.optimizer, data, on_step=after_step))
                except Interrupted:
                    self.state.wall_seconds += time.perf_counter() - started
                    raise
                except clip.NonFiniteGradError as exc:
                    raise SecateursError(f"train.nonfinite='error': epoch {self.state.epoch + 1}, {exc}") from None
                self.state.history.append({
                    "epoch": self.state.epoch + 1,
                    "phase": phase.name,
                    "loss": float(loss),
                    "val_accuracy": accuracy(self.model, self.data.val),
                    "sparsity": self._sparsity(),
                })
                self.state.epoch += 1
                self.state.wall_seconds += time.perf_counter() - started
                started = time.perf_counter()
                self.save_checkpoint()
                bar.advance(self.state.history[-1])
        if "dense" not in self.state.report:
            self.state.report["dense"] = self._dense_metrics()
        return self._finish(time.perf_counter() - started)

    def _finish(self, tail_seconds: float) -> dict[str, Any]:
        if self.pruner is not None:
            targets = {name: mask.numel() for name, mask in self.pruner.masks.items()}
            self.pruner.finalize()
        else:
            targets = {}
        model_path = self.out / "model.safetensors"
        if distributed.is_main():
            if prune.pruning_record(self.model) is not None:
                prune.save_structured(self.model, model_path)
            else:
                prune.save(self.model, model_path)
        distributed.barrier()  # every rank reports the size of rank 0's file
        report = reports.build_report(
            cfg=self.cfg,
            data=self.data,
            model=self.model,
            example=self.example,
            targets=targets,
            dense=self.state.report["dense"],
            final_accuracy=accuracy(self.model, self.data.test),
            final_val_accuracy=accuracy(self.model, self.data.val),
            checkpoint_bytes=model_path.stat().st_size,
            log=self.log,
            history=self.state.history,
            wall_seconds=self.state.wall_seconds + tail_seconds,
            world_size=self.world_size,
        )
        if distributed.is_main():
            reports.write_all(self.out, report, self.log, self.state.history)  # report.json last: the run is done
            if self.structure_file:
                (self.out / self.structure_file).unlink(missing_ok=True)
        return report


def start(cfg: RunConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """A new run: create ``out`` (it must be empty or absent), write the config, execute.

    Under ``torchrun`` every rank calls this; they join one process group for the run.
    """
    with distributed.process_group():
        _checked_world_size(cfg)
        if out.exists() and any(out.iterdir()):
            raise SecateursError(f"--out: {str(out)!r} is not empty; allowed: a new or empty folder (or --resume {out})")
        run = Run(cfg, out, progress=progress)  # bad data or model fails here, before anything is written
        distributed.barrier()  # every rank has looked before rank 0 writes
        if distributed.is_main():
            try:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out / "config.toml", to_toml(cfg))
            except OSError as exc:
                raise SecateursError(f"--out: cannot write to {str(out)!r} ({exc.strerror})") from None
        return run.execute()


def resume(out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Continue the run in ``out`` from its last epoch checkpoint."""
    from secateurs.experiment.config import load_config

    if not (out / "config.toml").is_file():
        raise SecateursError(f"--resume: {str(out)!r} holds no config.toml; allowed: the folder of an earlier run")
    if not (out / CHECKPOINT).is_file():
        raise SecateursError(f"--resume: {str(out)!r} holds no {CHECKPOINT}; the run ended before its first epoch")
    if (out / "report.json").is_file():  # killed after the last file was written: nothing to redo
        try:
            return json.loads((out / "report.json").read_text())
        except json.JSONDecodeError:
            pass
    cfg = load_config(out / "config.toml")
    with distributed.process_group():
        if distributed.is_main():  # temporary files of writes a kill interrupted
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        return Run(cfg, out, progress=progress).execute(resume=True)
