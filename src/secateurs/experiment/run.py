"""``secateurs run``: train dense, prune on a schedule, fine-tune, evaluate, report.

A run is a sequence of epochs in three phases (dense, prune, finetune). After every epoch the
whole state (model, optimizer, pruner and schedule, clip rule and log, history, RNG) is written
atomically to ``checkpoint.safetensors``, so ``secateurs run --resume DIR`` continues a run that
was killed at any moment and ends with the same weights and report, bit for bit on CPU: from
epoch 0 if only its config.toml was written, from its last checkpoint, only the final model and
report if every epoch was done, and nothing at all once report.json is there. A run killed
before its config.toml was in place leaves at most temporary files, and ``secateurs run
--out DIR`` accepts such a folder again; a folder with a config.toml is refused by ``--out``
with the ``--resume`` command that continues it.

The whole run lives on ``train.device`` (:func:`~secateurs.experiment.train.resolve_device`):
the model, each batch (moved there before its forward pass), the clip rule's state, the masks
and scores, the metrics and the latency measurement. Files hold CPU tensors, so a run trained
on a GPU loads, and resumes, anywhere.

Under ``torchrun --nproc-per-node N`` every rank runs this same loop on its shard of each
epoch's batches (``data.batch_size`` stays the global batch, split evenly over the ranks) with
the model in DDP; see :mod:`~secateurs.experiment.distributed`. Every rank evaluates the whole
validation and test splits, checks after each pruning step that all ranks hold the same masks,
and reads the same checkpoint on resume; only rank 0 writes files.

:class:`Run` wires together units that each live, and are tested, on their own:

- :mod:`~secateurs.experiment.plan`: the phases, and each epoch's learning rate and seed;
- :meth:`Run.run_epoch`: one dense, prune or fine-tune epoch (:func:`~secateurs.experiment.train.train_epoch`);
- :mod:`~secateurs.experiment.pruning`: the pruner or structured rounds and the schedule driving
  them, and a prune epoch's tick; a structured round also gets a new optimizer around the same
  clip rule and log (:func:`~secateurs.experiment.train.rebuilt_optimizer`);
- :mod:`~secateurs.experiment.checkpoint`: save after every epoch, restore on resume;
- :mod:`~secateurs.experiment.results`: the dense measurement and the final model and report.

Building a run changes nothing global; :meth:`Run.execute` sets torch's thread count and seeds
its RNG only while it runs, and restores both after.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from secateurs import clip, prune
from secateurs.errors import SecateursError
from secateurs.experiment import distributed, reports
from secateurs.experiment.checkpoint import CHECKPOINT, RunCheckpoint, RunState, tidy
from secateurs.experiment.config import RunConfig, to_toml
from secateurs.experiment.data import Dataset, batches, load_dataset
from secateurs.experiment.models import build_model
from secateurs.experiment.plan import EpochPlan, Phase
from secateurs.experiment.pruning import (
    StructuredRounds,
    make_pruner,
    make_schedule_for,
    pruning_tick,
)
from secateurs.experiment.results import dense_metrics, final_report
from secateurs.experiment.train import (
    Batch,
    accuracy,
    clipped_optimizer,
    rebuilt_optimizer,
    run_device,
    to_device,
    train_epoch,
)
from secateurs.prune.schedules import Schedule
from secateurs.serialization import atomic_write_text

__all__ = ["CHECKPOINT", "EpochPlan", "Interrupted", "Phase", "Run", "RunState", "finished", "resume", "resume_command", "start"]


class Interrupted(Exception):
    """Ctrl-C arrived; the run stopped after a whole step and can be resumed."""


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
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0: leave torch's setting), then restore."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(previous)


@contextmanager
def own_rng(device: torch.device) -> Iterator[None]:
    """Run the block on a fork of torch's RNG (the CPU's, and ``device``'s when it is a GPU), restored after."""
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device.index or 0], device_type="cuda"):
            yield
    elif device.type == "mps":
        with torch.random.fork_rng(devices=[0], device_type="mps"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


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
    """One configured run writing into ``out``. Use :meth:`execute`.

    Building it loads the data and builds the model, clip rule, pruner (or structured rounds),
    schedule and optimizer; it changes nothing global (torch's threads and RNG are as before).
    """

    def __init__(self, cfg: RunConfig, out: Path, *, progress: bool = True, started: float | None = None):
        # the wall time counts from here, or from ``started`` (a time.perf_counter() value: the
        # CLI passes its process start, so imports and config loading count too)
        self._constructed = time.perf_counter() if started is None else started
        self.cfg = cfg
        self.out = out
        self.progress = progress and distributed.is_main()
        self.plan = EpochPlan.from_config(cfg)
        self.world_size = _checked_world_size(cfg)
        self.device = run_device(cfg.train.device)
        """Where the whole run lives (``train.device`` resolved on this machine): model, batches,
        clip rule, masks, scores and metrics; checkpoints hold CPU tensors either way."""
        self.checkpoint = RunCheckpoint(out)
        self.state = RunState()
        self.pruner: prune.Pruner | None = None
        self.surgery: StructuredRounds | None = None  # structured runs: the channel-removing rounds
        self.schedule: Schedule | None = None
        self._ddp: torch.nn.Module | None = None  # self.model in DDP; rebuilt when the model changes
        with torch_threads(cfg.train.threads), own_rng(self.device):
            self.data: Dataset = load_dataset(cfg.data)
            torch.random.default_generator.manual_seed(cfg.seed)  # the model's initial weights, the same on every device
            self.model = build_model(cfg.model.name, input_shape=self.data.input_shape, num_classes=self.data.num_classes)
            self.model.to(self.device)
            self.example = self.data.val.x[:32].to(self.device)
            self.rule = clip.build(cfg.clip.method, **cfg.clip.params())
            self.log = clip.ClipLog()
            if cfg.prune.kind == "unstructured":
                self.pruner = make_pruner(cfg.prune, self.model)  # a random criterion draws its seed here
                self.schedule = make_schedule_for(cfg.prune, self.pruner)
            elif cfg.prune.kind == "structured":
                self.surgery = StructuredRounds(
                    self.model, self.example, sparsity=cfg.prune.sparsity if cfg.prune.threshold is None else None,
                    threshold=cfg.prune.threshold, criterion=cfg.prune.criterion,
                    scope=cfg.prune.scope, exclude=tuple(cfg.prune.exclude),
                )
                self.schedule = make_schedule_for(cfg.prune, self.surgery)
            self.optimizer = clipped_optimizer(cfg.train, self.model.parameters(), lr=cfg.train.lr, rule=self.rule, log=self.log)
            self._attach_pruner()

    # --- the loop ------------------------------------------------------------------------------

    def execute(self, *, resume: bool = False) -> dict[str, Any]:
        """Run (or continue) every epoch, then write the final model and the reports.

        torch's thread count and RNG are the run's own while it executes and restored after.
        """
        with torch_threads(self.cfg.train.threads), own_rng(self.device):
            if resume:
                self.restore()
            if self.state.rng is not None:
                torch.set_rng_state(self.state.rng)
            started = self._constructed  # data loading and model building count too
            with _stop_on_sigint() as should_stop, reports.progress_bars(self.progress) as bars:
                bar = None
                while self.state.epoch < self.plan.total:
                    phase, local = self.plan.phase_at(self.state.epoch)
                    if bar is None or bar.phase != phase.name:
                        bar = bars.phase(phase.name, phase.epochs, completed=local)
                    try:
                        row = self.run_epoch(should_stop)
                    except Interrupted:
                        self.state.wall_seconds += time.perf_counter() - started
                        raise
                    self.state.wall_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
                    bar.advance(row)
            if "dense" not in self.state.report:
                self.state.report["dense"] = dense_metrics(self)
            report = final_report(self, wall_seconds=lambda: self.state.wall_seconds + time.perf_counter() - started)
            self.checkpoint.discard_structure()
            return report

    def run_epoch(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The next epoch, whichever phase it is in: set its learning rate, measure the dense
        model when dense training is over, seed torch, take the schedule's tick in the prune
        phase, train one pass, and append the epoch's row to the history (returned).

        Raises :class:`Interrupted` after the step during which ``should_stop()`` turned true
        on any rank.
        """
        epoch = self.state.epoch
        phase, _ = self.plan.phase_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.plan.lr_at(epoch)
        if phase.name != "dense" and "dense" not in self.state.report:
            self.state.report["dense"] = dense_metrics(self)
        torch.manual_seed(self.plan.seed_at(epoch))
        if phase.name == "prune":
            self._prune_tick()
        data = self._batches(self.plan.seed_at(epoch), augment=self.cfg.data.augment)

        def after_step() -> None:
            if distributed.any_rank(should_stop()):  # every rank stops after the same step
                raise Interrupted

        try:
            loss = distributed.all_mean(train_epoch(self._trained_model(), self.optimizer, data, on_step=after_step))
        except clip.NonFiniteGradError as exc:
            raise SecateursError(f"train.nonfinite='error': epoch {epoch + 1}, {exc}") from None
        row = {
            "epoch": epoch + 1,
            "phase": phase.name,
            "loss": float(loss),
            "val_accuracy": accuracy(self.model, self.data.val),
            "sparsity": self._sparsity(),
            "steps": self.log.total_steps,  # optimizer steps so far: grad_norm.png marks the phases by them
        }
        self.state.history.append(row)
        self.state.epoch += 1
        return row

    # --- pruning -------------------------------------------------------------------------------

    def _sparsity(self) -> float:
        """What the progress bar and accuracy.png show: the targeted weights at zero
        (unstructured), or the fraction of the original channels removed (structured)."""
        if self.pruner is not None:
            return self.pruner.current_sparsity
        record = prune.pruning_record(self.model) if self.surgery is not None else None
        return float(record["sparsity"]) if record else 0.0

    def _prune_tick(self) -> None:
        """The schedule's tick of this prune-phase epoch; a structured round also replaces the
        model and its optimizer. Under torchrun, checks every rank pruned the same."""
        assert self.schedule is not None
        pruned = pruning_tick(self.schedule, self._scoring_batches)
        if self.surgery is not None:
            if pruned:
                self.model = self.surgery.model
                self.rebuild_optimizer()
                if self.world_size > 1:
                    shapes = {name: torch.tensor(p.shape) for name, p in self.model.named_parameters()}
                    where = f"structured round at epoch {self.state.epoch + 1}: layer shapes"
                    distributed.check_same_on_every_rank(where, distributed.checksum(shapes))
        elif self.pruner is not None and self.world_size > 1:
            where = f"masks after the pruning step of epoch {self.state.epoch + 1}"
            distributed.check_same_on_every_rank(where, distributed.checksum(self.pruner.masks))

    def _scoring_batches(self) -> Iterable[Batch]:
        """The batches a data-dependent criterion scores on, from this epoch's seed."""
        seed = self.plan.seed_at(self.state.epoch)
        n = self.cfg.prune.score_batches
        if self.surgery is not None:
            # unsharded: every rank scores the same batches, so every rank removes the same channels
            return [to_device(b, self.device) for b in islice(batches(self.data.train, self.cfg.data.batch_size, seed=seed), n)]
        return (to_device(b, self.device) for b in islice(self._batches(seed), n))  # this rank's share; the pruner all-reduces scores

    def rebuild_optimizer(self) -> None:
        """A new optimizer for the model's current parameters (after surgery, or a restored
        shape), around the same clip rule and log: moments restart, the clip state carries on."""
        self.optimizer = rebuilt_optimizer(self.optimizer, self.cfg.train, self.model.parameters())
        self._attach_pruner()
        self._ddp = None

    def _attach_pruner(self) -> None:
        if self.pruner is not None:
            self.pruner.attach(self.optimizer)  # the wrapper: pruned gradients are zero before the rule's norm

    # --- data and DDP --------------------------------------------------------------------------

    def _batches(self, seed: int, **kwargs: Any) -> Iterator[Batch]:
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

    def save_checkpoint(self) -> None:
        """Write the state after the latest epoch atomically (rank 0; see :class:`RunCheckpoint`)."""
        self.checkpoint.save(self)

    def restore(self) -> None:
        """Load ``checkpoint.safetensors`` from ``out`` into this freshly built run."""
        self.checkpoint.restore(self)
        self._ddp = None


def _not_empty(out: Path) -> SecateursError:
    """The error for an ``--out`` that is not empty, with the hint that works for what it holds."""
    where = f"--out: {str(out)!r} is not empty"
    if not out.is_dir():
        return SecateursError(f"--out: {str(out)!r} is a file; allowed: a new or empty folder")
    if (out / "report.json").is_file():
        return SecateursError(f"{where}: it holds a finished run; allowed: a new or empty folder")
    if (out / "config.toml").is_file():
        return SecateursError(
            f"{where}: it holds an unfinished run; allowed: a new or empty folder, "
            f"or continue that run with: {resume_command(out)}"
        )
    return SecateursError(f"{where}; allowed: a new or empty folder")


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out`` (under torchrun: with as many ranks)."""
    world = distributed.world_size() if distributed.world_size() > 1 else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return f"torchrun --nproc-per-node {world} -m secateurs run --resume {out}"
    return f"secateurs run --resume {out}"


def _only_partial_files(out: Path) -> bool:
    """Whether ``out`` holds nothing but temporary files of atomic writes (``.NAME.*.tmp``): what
    a run killed before its config.toml was in place leaves. Such a folder counts as empty."""
    return all(p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp") for p in out.iterdir())


def start(cfg: RunConfig, out: Path, *, progress: bool = True, started: float | None = None) -> dict[str, Any]:
    """A new run: create ``out`` (it must be absent, empty, or hold only the temporary files of a
    run killed before it wrote its config), write the config, execute.

    A folder holding a run's ``config.toml`` is refused with the ``--resume`` command that
    continues it (see :func:`resume`). ``started`` (a ``time.perf_counter()`` value) is when
    the wall time starts counting (default: when the run is built). Under ``torchrun`` every
    rank calls this; they join one process group for the run.
    """
    with distributed.process_group():
        _checked_world_size(cfg)
        if out.exists() and (not out.is_dir() or not _only_partial_files(out)):
            raise _not_empty(out)
        run = Run(cfg, out, progress=progress, started=started)  # bad data, model or device fails here, before anything is written
        distributed.barrier()  # every rank has looked before rank 0 writes
        if distributed.is_main():
            try:
                out.mkdir(parents=True, exist_ok=True)
                tidy(out)
                atomic_write_text(out / "config.toml", to_toml(cfg))
            except OSError as exc:
                raise SecateursError(f"--out: cannot write to {str(out)!r} ({exc.strerror})") from None
        return run.execute()


def finished(out: Path) -> dict[str, Any] | None:
    """The report of the finished run in ``out`` (``report.json`` is written last), else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def resume(out: Path, *, progress: bool = True, started: float | None = None) -> dict[str, Any]:
    """Continue the run in ``out`` wherever it was killed, to the files an uninterrupted run
    writes (bit for bit on CPU, timings aside):

    - config.toml but no checkpoint (killed before its first epoch ended): from epoch 0;
    - a checkpoint: from the epoch after it (also when every epoch is done but the final
      model or report is missing: only the end is redone);
    - report.json (finished): nothing is run; leftovers of the kill are removed and the
      report is returned (:func:`finished` tells the two apart).

    Temporary files of interrupted writes, and shape side files no checkpoint names, are
    removed first. A folder without config.toml cannot be continued (the config is not known);
    one that holds only temporary files (killed before the config was written) is accepted
    by ``secateurs run CONFIG --out DIR`` again, and the error says so.
    """
    from secateurs.experiment.config import load_config

    if not out.exists():
        raise SecateursError(f"--resume: {str(out)!r} does not exist; allowed: the folder of an earlier secateurs run")
    if not out.is_dir():
        raise SecateursError(f"--resume: {str(out)!r} is not a folder; allowed: the folder of an earlier secateurs run")
    if not (out / "config.toml").is_file():
        if _only_partial_files(out):
            raise SecateursError(
                f"--resume: {str(out)!r} holds no config.toml: the run was stopped before it wrote its config, so there "
                f"is nothing to continue; allowed: start it again with: secateurs run CONFIG --out {out} "
                "(a folder holding only such temporary files is accepted)"
            )
        raise SecateursError(
            f"--resume: {str(out)!r} holds no config.toml, so it is not the folder of a secateurs run; "
            "allowed: a folder that secateurs run --out wrote"
        )
    report = finished(out)
    if report is not None:  # killed after the last file was written: nothing to redo
        if os.environ.get("RANK", "0") == "0":  # no process group is started for this
            tidy(out)
        return report
    cfg = load_config(out / "config.toml")
    with distributed.process_group():
        run = Run(cfg, out, progress=progress, started=started)
        distributed.barrier()  # every rank has built its run (and read the folder) before rank 0 tidies it
        has_checkpoint = (out / CHECKPOINT).is_file()
        if distributed.is_main() and not has_checkpoint:
            tidy(out)  # checkpoint.restore tidies around the file it reads
        return run.execute(resume=has_checkpoint)
