"""``secateurs sweep``: the same run over a grid of criteria x sparsities x seeds (x clipping rules).

Blalock et al. (2020) found pruning results hard to compare because papers report one operating
point, one seed and no baseline. A sweep reports every point of the grid, its spread over seeds,
and the dense model it started from.

The output folder::

    OUT/sweep.toml                       the base config; a rerun must match it but for the grid
    OUT/dense/seed0/                     dense training, once per seed (and clipping rule)
    OUT/cells/magnitude-s0.9-seed0/      one ordinary run folder per cell (report.json, ...)
    OUT/sweep.csv, sweep.md, tradeoff.png

Every cell with the same seed and clipping rule trains the same dense model first. That model is
trained once, in ``OUT/dense``, and each cell starts from a copy of its last dense checkpoint:
the cell ends with the same weights, bit for bit, as ``secateurs run`` of the cell's own
``config.toml`` (criteria that watch training, such as movement, train their own dense phase).

Rerunning the same command resumes: a cell whose folder holds ``report.json`` is finished and is
not run again; a cell with a checkpoint continues from it; anything else in a cell folder is
cleared and the cell starts again. ``jobs`` > 1 runs cells in worker processes, with the same
results.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateurs import clip, prune
from secateurs.errors import SecateursError
from secateurs.experiment import run as runner
from secateurs.experiment.checkpoint import TIMING
from secateurs.experiment.config import RunConfig, to_toml, validate
from secateurs.serialization import atomic_write_bytes, atomic_write_text, load_state, save_state

CSV_COLUMNS = (
    "cell", "criterion", "sparsity", "seed", "clip", "accuracy", "val_accuracy", "dense_accuracy",
    "sparsity_reached", "compression_ratio", "nonzero_params", "params", "macs", "dense_macs",
    "checkpoint_bytes", "dense_checkpoint_bytes", "latency_ms", "wall_seconds",
)
"""The columns of ``sweep.csv``, one row per cell; accuracies are fractions in [0, 1]."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid and the run config that realises it."""

    criterion: str
    sparsity: float
    seed: int
    clip: str  # label of the clipping rule; "" when the sweep does not vary it
    config: RunConfig

    @property
    def name(self) -> str:
        """Folder name, e.g. ``magnitude-s0.9-seed0`` (``-agc`` appended when clipping varies)."""
        return "-".join([self.criterion, f"s{self.sparsity:g}", f"seed{self.seed}", *([self.clip] if self.clip else [])])

    @property
    def dense_name(self) -> str:
        """Folder of the dense run this cell can start from: one per seed and clipping rule."""
        return "-".join([f"seed{self.seed}", *([self.clip] if self.clip else [])])


def _clip_choices(base: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """(label, clip section) for every clipping rule of the grid; one unlabelled when none vary."""
    if not base.sweep.clip_methods:
        return [("", base.clip.model_dump(mode="json"))]
    choices: list[tuple[str, dict[str, Any]]] = []
    for item in base.sweep.clip_methods:
        if isinstance(item, str):
            params = base.clip.params() if item == base.clip.method else {}
            try:
                clip.build(item, **params)
            except SecateursError as exc:
                raise SecateursError(
                    f"sweep.clip_methods: got {item!r}, which needs arguments ({exc}); "
                    f"allowed: an inline table such as {{method = {json.dumps(item)}, max_norm = 1.0}}"
                ) from None
            section = {"method": item, **params}
        else:
            section = dict(item)
        choices.append((section["method"], section))
    labels = [label for label, _ in choices]
    if len(set(labels)) < len(labels):  # the same rule twice with other arguments: name the arguments
        choices = [
            ("_".join([label, *(f"{k}{v}" for k, v in section.items() if k != "method")]), section)
            for label, section in choices
        ]
    if len({label for label, _ in choices}) < len(choices):
        raise SecateursError(f"sweep.clip_methods: got {base.sweep.clip_methods!r}; allowed: distinct rules")
    return choices


def plan(base: RunConfig) -> list[Cell]:
    """Every cell of ``base.sweep``'s grid, seed by seed, each config validated before any work."""
    data = base.model_dump(mode="json")
    for criterion in base.sweep.criteria:
        try:
            validate({**data, "prune": {**data["prune"], "criterion": criterion}})
        except SecateursError as exc:
            raise SecateursError(f"sweep.criteria: {str(exc).removeprefix('prune.criterion: ')}") from None
    cells: list[Cell] = []
    for label, clip_section in _clip_choices(base):
        for seed in base.sweep.seeds:
            for criterion in base.sweep.criteria:
                for sparsity in base.sweep.sparsities:
                    # sweep and sensitivity sections left at their defaults: a cell's config
                    # (and so its folder's config.toml) does not change when the grid grows
                    cell = {**data, "seed": seed, "clip": clip_section, "sweep": {}, "sensitivity": {}}
                    cell["prune"] = {**data["prune"], "criterion": criterion, "sparsity": sparsity}
                    try:
                        cfg = validate(cell)
                    except SecateursError as exc:
                        raise SecateursError(f"sweep: the cell {criterion} at {sparsity} (seed {seed}) is not a valid run: {exc}") from None
                    cells.append(Cell(criterion, sparsity, seed, label, cfg))
    return cells


def dense_config(cell: Cell) -> RunConfig:
    """The dense-only run (``prune.kind = 'none'``) whose training every cell like ``cell`` shares."""
    data = cell.config.model_dump(mode="json")
    data["prune"] = {"kind": "none"}  # nothing else in the section touches dense training
    return validate(data)


def shares_dense(cfg: RunConfig) -> bool:
    """Whether a cell may start from the shared dense checkpoint without changing its result.

    True for unstructured pruning after at least one dense epoch with a criterion that does not
    watch the optimizer (movement scores accumulate during dense training, so it trains its own).
    """
    if cfg.prune.kind != "unstructured" or cfg.train.epochs == 0:
        return False
    return getattr(prune.make_criterion(cfg.prune.criterion), "on_optimizer_step", None) is None


# --- running cells ---------------------------------------------------------------------------


def _finished(folder: Path) -> dict[str, Any] | None:
    path = folder / "report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _execute(run: runner.Run) -> dict[str, Any]:
    from rich.errors import LiveError

    try:
        return run.execute()
    except LiveError:  # rich before nested live displays: the cell runs without its own bars
        run.progress = False
        return run.execute()


def _resumable(cfg: RunConfig, folder: Path, progress: bool) -> runner.Run | None:
    """The run in ``folder`` restored from its checkpoint, or None if it has none that fits."""
    config_file, checkpoint = folder / "config.toml", folder / runner.CHECKPOINT
    if not (config_file.is_file() and checkpoint.is_file()):
        return None
    if config_file.read_text(encoding="utf-8") != to_toml(cfg):
        return None
    run = runner.Run(cfg, folder, progress=progress)
    try:
        run.restore()
    except SecateursError:
        return None
    return run


def run_cell(cfg: RunConfig, folder: Path, *, dense: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Finish the run of ``cfg`` in ``folder`` and return its report.

    A finished folder of the same config is read, not run (of another config: an error); a folder with a checkpoint of this config resumes; any
    other content is removed first. ``dense`` is the folder of a finished dense-only run of the
    same seed, data, model, training and clipping: the cell then starts after its dense phase.
    """
    report = _finished(folder)
    if report is not None:
        config_file = folder / "config.toml"
        if config_file.is_file() and config_file.read_text(encoding="utf-8") != to_toml(cfg):
            raise SecateursError(f"--out: {str(folder)!r} holds a finished run of another config; allowed: remove that folder, or a new --out")
        return report
    run = _resumable(cfg, folder, progress)
    if run is not None:
        return _execute(run)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(folder / "config.toml", to_toml(cfg))
    run = runner.Run(cfg, folder, progress=progress)
    if dense is None:
        return _execute(run)
    tree = load_state(dense / runner.CHECKPOINT)
    if int(tree["epoch"]) != cfg.train.epochs:
        raise SecateursError(f"sweep: {str(dense)!r} stopped after epoch {tree['epoch']}, not {cfg.train.epochs}; remove it to train it again")
    # The dense run has no pruner: give the cell's checkpoint the cell's own fresh pruner state.
    tree["pruner"] = run.pruner.state_dict() if run.pruner is not None else None
    tree["schedule"] = run.schedule.state_dict() if run.schedule is not None else None
    save_state(folder / runner.CHECKPOINT, tree)
    if (dense / TIMING).is_file():  # the dense phase's wall time counts in the cell's, as it did in the dense run's
        atomic_write_text(folder / TIMING, (dense / TIMING).read_text())
    run.restore()
    return _execute(run)


# --- the sweep -------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _claim(base: RunConfig, out: Path) -> None:
    """Make ``out`` this sweep's folder, or check that it already is (same base config)."""
    marker = out / "sweep.toml"
    if marker.is_file():
        from secateurs.experiment.config import load_config

        before = load_config(marker).model_dump(mode="json")
        now = base.model_dump(mode="json")
        before.pop("sweep")
        now.pop("sweep")
        a, b = _flatten(before), _flatten(now)
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if changed:
            raise SecateursError(
                f"--out: {str(out)!r} holds a sweep of another base config (differs in {', '.join(changed[:5])}); "
                "allowed: the same config (only the sweep section may change) or a new folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise SecateursError(f"--out: {str(out)!r} is not empty and holds no sweep.toml; allowed: a new or empty folder, or an earlier sweep's")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, to_toml(base))
    except OSError as exc:
        raise SecateursError(f"--out: cannot write to {str(out)!r} ({exc.strerror})") from None


@contextmanager
def _grid_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[str, bool], None]]:
    """The sweep's own bar; each cell's phase bars appear below it while the cell runs."""
    if not enabled:
        yield lambda status, advance: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with bar:
        task = bar.add_task("sweep", total=total, completed=done, status="")

        def update(status: str, advance: bool) -> None:
            bar.update(task, advance=1 if advance else 0, status=status)

        yield update


def sweep(
    base: RunConfig,
    out: Path,
    *,
    progress: bool = True,
    jobs: int = 1,
    on_cell: Callable[[Cell, dict[str, Any], Path], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or finish) every cell of ``base.sweep`` into ``out``; write sweep.csv/md and tradeoff.png.

    ``jobs`` > 1 runs that many cells at once in worker processes (each with
    ``train.threads`` threads, or its share of the cores when that is 0); the results are the
    same as with one job. Returns one ``sweep.csv`` row per cell. ``on_cell(cell, report,
    folder)`` is called after each cell that this call ran (not for cells found finished).
    """
    if not (isinstance(jobs, int) and jobs >= 1):
        raise SecateursError(f"--jobs: got {jobs!r}; allowed: an integer >= 1")
    cells = plan(base)
    from secateurs.experiment.data import load_dataset
    from secateurs.experiment.models import build_model

    # Fail on a bad dataset or model before the first cell, not after the first dense phase.
    data = load_dataset(base.data)
    build_model(base.model.name, input_shape=data.input_shape, num_classes=data.num_classes)
    _claim(base, out)
    started = time.perf_counter()
    reports = {c.name: r for c in cells if (r := _finished(out / "cells" / c.name)) is not None}
    with _grid_bar(progress, len(cells), len(reports)) as bar:
        pending = [c for c in cells if c.name not in reports]
        if jobs == 1:
            for cell in pending:
                dense = _dense_folder(out, cell)
                if dense is not None and _finished(dense) is None:
                    bar(f"dense {cell.dense_name}", False)
                    run_cell(dense_config(cell), dense, progress=progress)
                bar(cell.name, False)
                folder = out / "cells" / cell.name
                reports[cell.name] = run_cell(cell.config, folder, dense=dense, progress=progress)
                bar(cell.name, True)
                if on_cell is not None:
                    on_cell(cell, reports[cell.name], folder)
        else:
            _run_parallel(out, pending, jobs, reports, bar, on_cell)
    rows = [csv_row(cell, reports[cell.name]) for cell in cells]
    write_results(out, rows, base, seconds=time.perf_counter() - started)
    return rows


def _dense_folder(out: Path, cell: Cell) -> Path | None:
    return out / "dense" / cell.dense_name if shares_dense(cell.config) else None


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker(cfg: RunConfig, folder: str, dense: str | None) -> dict[str, Any]:
    return run_cell(cfg, Path(folder), dense=Path(dense) if dense else None, progress=False)


def _run_parallel(
    out: Path,
    pending: Sequence[Cell],
    jobs: int,
    reports: dict[str, dict[str, Any]],
    bar: Callable[[str, bool], None],
    on_cell: Callable[[Cell, dict[str, Any], Path], None] | None,
) -> None:
    """Dense runs first, each cell as soon as its dense run is done; ``jobs`` worker processes."""
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = pending[0].config.train.threads if pending else 1
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    waiting: dict[str, list[Cell]] = {}  # dense run -> cells that start from it
    ready: list[Cell] = []
    dense_cfg: dict[str, RunConfig] = {}
    for cell in pending:
        dense = _dense_folder(out, cell)
        if dense is None or _finished(dense) is not None:
            ready.append(cell)
        else:
            waiting.setdefault(cell.dense_name, []).append(cell)
            dense_cfg.setdefault(cell.dense_name, dense_config(cell))
    running: dict[Future[dict[str, Any]], tuple[str, Cell | None]] = {}
    context = multiprocessing.get_context("spawn")  # fork after torch starts threads can hang
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(threads,))

    def submit(cell: Cell) -> None:
        dense = _dense_folder(out, cell)
        future = pool.submit(_worker, cell.config, str(out / "cells" / cell.name), str(dense) if dense else None)
        running[future] = (cell.name, cell)

    try:
        for name, cfg in dense_cfg.items():
            running[pool.submit(_worker, cfg, str(out / "dense" / name), None)] = (f"dense {name}", None)
        for cell in ready:
            submit(cell)
        while running:
            bar("running " + ", ".join(name for name, _ in running.values()), False)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name, cell = running.pop(future)
                report = future.result()
                if cell is None:  # a dense run: its cells may start
                    for waiting_cell in waiting.pop(name.removeprefix("dense "), []):
                        submit(waiting_cell)
                    continue
                reports[cell.name] = report
                bar(cell.name, True)
                if on_cell is not None:
                    on_cell(cell, report, out / "cells" / cell.name)
    except (KeyboardInterrupt, BrokenProcessPool):
        pool.shutdown(wait=True, cancel_futures=True)
        raise runner.Interrupted from None
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def csv_row(cell: Cell, report: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sweep.csv`` row of one finished cell."""
    d, f = report["dense"], report["final"]
    return {
        "cell": cell.name,
        "criterion": cell.criterion,
        "sparsity": cell.sparsity,
        "seed": cell.seed,
        "clip": cell.clip or cell.config.clip.method,
        "accuracy": f["accuracy"],
        "val_accuracy": f["val_accuracy"],
        "dense_accuracy": d["accuracy"],
        "sparsity_reached": f["sparsity"],
        "compression_ratio": f["compression_ratio"],
        "nonzero_params": f["nonzero_params"],
        "params": f["params"],
        "macs": f["macs"],
        "dense_macs": d["macs"],
        "checkpoint_bytes": f["checkpoint_bytes"],
        "dense_checkpoint_bytes": d["checkpoint_bytes"],
        "latency_ms": f["latency_ms"],
        "wall_seconds": report["wall_seconds"],
    }


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of one metric over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarise ``values``."""
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per (clip, criterion, sparsity): accuracy, compression, non-zeros and bytes over seeds;
    per clip: the dense accuracy over seeds (each seed's dense model counted once)."""
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    dense: dict[str, dict[int, float]] = {}
    for row in rows:
        groups.setdefault((row["clip"], row["criterion"], row["sparsity"]), []).append(row)
        dense.setdefault(row["clip"], {})[row["seed"]] = row["dense_accuracy"]
    cells = {
        key: {metric: Stat.of([r[metric] for r in group]) for metric in ("accuracy", "compression_ratio", "nonzero_params", "checkpoint_bytes", "macs")}
        for key, group in groups.items()
    }
    return {"cells": cells, "dense": {c: Stat.of(list(by_seed.values())) for c, by_seed in dense.items()}}


def _pm(stat: Stat, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std``; just the mean for a single seed, which has no spread to show."""
    if stat.n < 2:
        return f"{scale * stat.mean:.{digits}f}"
    return f"{scale * stat.mean:.{digits}f} ± {scale * stat.std:.{digits}f}"


def markdown(rows: Sequence[Mapping[str, Any]], base: RunConfig, *, seconds: float | None = None) -> str:
    """sweep.md: test accuracy per criterion and sparsity (mean ± std over seeds), dense baseline, sizes."""
    summary = summarise(rows)
    clips = list(dict.fromkeys(r["clip"] for r in rows))
    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    first = rows[0]
    lines = [
        f"# secateurs sweep: {base.model.name} on {base.data.name}",
        "",
        f"{len(rows)} runs: criteria {', '.join(criteria)} x sparsities {', '.join(f'{s:g}' for s in sparsities)} "
        f"x seeds {', '.join(map(str, seeds))}" + (f" x clipping {', '.join(clips)}" if len(clips) > 1 else "") + ". "
        f"Pruning {base.prune.kind}, scope {base.prune.scope}, schedule {base.prune.schedule}; "
        f"{base.train.epochs} dense + {base.prune.epochs} pruning + {base.prune.finetune_epochs} fine-tuning epochs.",
        "",
        (f"Test accuracy in %, mean ± sample standard deviation over {len(seeds)} seeds; " if len(seeds) > 1 else "Test accuracy in %, one seed; ")
        + "bold: the best mean at that sparsity.",
        "",
    ]
    for clip_label in clips:
        d = summary["dense"][clip_label]
        if len(clips) > 1:
            lines += [f"## Clipping: {clip_label}", ""]
        lines += [
            f"Dense baseline: **{_pm(d, digits=2)}** ({first['params']:,} parameters, "
            f"{first['dense_checkpoint_bytes']:,}-byte checkpoint).",
            "",
            "| criterion | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
            "| --- |" + " ---: |" * len(sparsities),
        ]
        best = {
            s: max((summary["cells"][(clip_label, c, s)]["accuracy"].mean for c in criteria if (clip_label, c, s) in summary["cells"]), default=math.nan)
            for s in sparsities
        }
        for criterion in criteria:
            cells = []
            for s in sparsities:
                stat = summary["cells"].get((clip_label, criterion, s), {}).get("accuracy")
                text = "" if stat is None else _pm(stat)
                cells.append(f"**{text}**" if stat is not None and stat.mean == best[s] else text)
            lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Size",
        "",
        "Mean over every run at that sparsity. Masks do not make dense kernels cheaper, so MACs stay "
        "at the dense count under unstructured pruning.",
        "",
        "| sparsity | compression | non-zero parameters | checkpoint bytes | MACs |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| dense | 1.0x | {first['params']:,} | {first['dense_checkpoint_bytes']:,} | {first['dense_macs']:,} |",
    ]
    for s in sparsities:
        at = [r for r in rows if r["sparsity"] == s]
        lines.append(
            f"| {100 * s:g}% | {statistics.fmean(r['compression_ratio'] for r in at):.1f}x | "
            f"{round(statistics.fmean(r['nonzero_params'] for r in at)):,} | "
            f"{round(statistics.fmean(r['checkpoint_bytes'] for r in at)):,} | {round(statistics.fmean(r['macs'] for r in at)):,} |"
        )
    lines += ["", "Every run: `sweep.csv`; each run's own report: `cells/<criterion>-s<sparsity>-seed<seed>/report.md`."]
    if seconds is not None:
        lines += [f"This invocation took {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """sweep.csv as text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(out: Path, rows: Sequence[Mapping[str, Any]], base: RunConfig, *, seconds: float | None = None) -> None:
    """Write sweep.csv, sweep.md and tradeoff.png into ``out`` (each atomically)."""
    from secateurs.experiment.sweep_plots import tradeoff_png

    atomic_write_text(out / "sweep.csv", csv_text(rows))
    atomic_write_text(out / "sweep.md", markdown(rows, base, seconds=seconds))
    atomic_write_bytes(out / "tradeoff.png", tradeoff_png(summarise(rows), title=f"{base.model.name} on {base.data.name}"))
