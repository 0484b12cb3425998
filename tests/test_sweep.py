"""`secateurs sweep`: the grid, the shared dense phase, resuming, and the table and plot it writes."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_tensors, interrupt_once_written
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.errors import SecateursError
from secateurs.experiment import sweep as sweeper
from secateurs.experiment.config import load_config, to_toml
from secateurs.experiment.run import start

# Smaller than conftest.QUICK_RUN: these tests run whole sweeps, some of them twice.
TINY = [
    "train.epochs=2", "prune.epochs=2", "prune.finetune_epochs=1", "data.limit=300", "train.threads=1",
    'sweep.criteria=["magnitude","random"]', "sweep.sparsities=[0.8]", "sweep.seeds=[0]",
]
TIMING = ("latency_ms", "wall_seconds")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


# --- the grid --------------------------------------------------------------------------------


def test_plan_is_every_criterion_sparsity_and_seed_seed_by_seed() -> None:
    cfg = load_config(overrides=['sweep.criteria=["magnitude","taylor"]', "sweep.sparsities=[0.5,0.9]", "sweep.seeds=[3,4]"])
    cells = sweeper.plan(cfg)
    assert [c.name for c in cells[:4]] == ["magnitude-s0.5-seed3", "magnitude-s0.9-seed3", "taylor-s0.5-seed3", "taylor-s0.9-seed3"]
    assert len(cells) == 8 and {c.seed for c in cells[4:]} == {4}
    for cell in cells:
        assert (cell.config.prune.criterion, cell.config.prune.sparsity, cell.config.seed) == (cell.criterion, cell.sparsity, cell.seed)
        assert cell.config.model_dump(exclude={"seed", "prune", "sweep"}) == cfg.model_dump(exclude={"seed", "prune", "sweep"})


def test_a_cell_config_does_not_depend_on_the_rest_of_the_grid() -> None:
    """Growing the grid later must leave finished cells (and their config.toml) valid."""
    small = sweeper.plan(load_config(overrides=["sweep.sparsities=[0.8]", "sweep.seeds=[0]"]))
    large = sweeper.plan(load_config(overrides=["sweep.sparsities=[0.8, 0.5]", "sweep.seeds=[0, 1]"]))
    by_name = {c.name: c for c in large}
    for cell in small:
        assert to_toml(cell.config) == to_toml(by_name[cell.name].config)
    assert to_toml(sweeper.dense_config(small[0])) == to_toml(sweeper.dense_config(by_name["random-s0.5-seed0"]))


def test_clip_methods_cross_the_grid_and_borrow_the_base_arguments() -> None:
    cfg = load_config(overrides=['sweep.clip_methods=["global_norm", "agc", {method = "norm", max_norm = 0.5}]', "sweep.seeds=[0]", 'sweep.criteria=["magnitude"]', "sweep.sparsities=[0.9]"])
    cells = sweeper.plan(cfg)
    assert [c.name for c in cells] == ["magnitude-s0.9-seed0-global_norm", "magnitude-s0.9-seed0-agc", "magnitude-s0.9-seed0-norm"]
    assert cells[0].config.clip.params() == {"max_norm": 1.0}  # the base config's argument
    assert cells[1].config.clip.params() == {}  # agc's own defaults
    assert cells[2].config.clip.params() == {"max_norm": 0.5}
    assert len({c.dense_name for c in cells}) == 3  # clipping changes dense training


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.seeds=[]", "sweep.seeds: got []; allowed: a non-empty list"),
        ("sweep.criteria=[]", "sweep.criteria: got []; allowed: a non-empty list"),
        ("sweep.sparsities=[]", "sweep.sparsities: got []; allowed: a non-empty list"),
        ("sweep.sparsities=[0.5, 1.0]", "sweep.sparsities: got [0.5, 1.0]; sparsity 1.0 is out of range"),
        ("sweep.seeds=[1, 1]", "sweep.seeds: got [1, 1]; allowed: distinct values"),
        ('sweep.clip_methods=[{max_norm = 1.0}]', "names no method"),
    ],
)
def test_bad_grid_is_rejected_by_the_config(override: str, message: str) -> None:
    with pytest.raises(SecateursError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=[override])


def test_unknown_criterion_names_the_sweep_field() -> None:
    with pytest.raises(SecateursError, match=r"sweep.criteria: got 'bogus'; allowed: magnitude"):
        sweeper.plan(load_config(overrides=['sweep.criteria=["magnitude","bogus"]']))


def test_clip_rule_that_needs_arguments_says_how_to_give_them() -> None:
    with pytest.raises(SecateursError, match=r"sweep.clip_methods: got 'norm', which needs arguments .* \{method = \"norm\", max_norm = 1.0\}"):
        sweeper.plan(load_config(overrides=['sweep.clip_methods=["norm"]']))


def test_dense_phase_is_shared_only_where_it_cannot_change_the_result() -> None:
    assert sweeper.shares_dense(load_config(overrides=["prune.criterion=taylor"]))
    assert not sweeper.shares_dense(load_config(overrides=["prune.criterion=movement"]))  # accumulates while training
    assert not sweeper.shares_dense(load_config(overrides=["train.epochs=0"]))
    assert not sweeper.shares_dense(load_config(overrides=["prune.kind=structured", "prune.criterion=magnitude"]))


# --- the table -------------------------------------------------------------------------------


def _row(criterion: str, sparsity: float, seed: int, accuracy: float, dense: float) -> dict[str, object]:
    return {
        "cell": f"{criterion}-s{sparsity}-seed{seed}", "criterion": criterion, "sparsity": sparsity, "seed": seed,
        "clip": "global_norm", "accuracy": accuracy, "val_accuracy": accuracy, "dense_accuracy": dense,
        "sparsity_reached": sparsity, "compression_ratio": 1 / (1 - sparsity), "nonzero_params": round(1000 * (1 - sparsity)),
        "params": 1000, "macs": 5000, "dense_macs": 5000, "checkpoint_bytes": 100, "dense_checkpoint_bytes": 400,
        "latency_ms": 1.0, "wall_seconds": 2.0,
    }


def test_summary_is_mean_and_sample_std_over_seeds_with_dense_counted_once_per_seed() -> None:
    rows = [
        _row("magnitude", 0.9, 0, 0.90, 0.98), _row("magnitude", 0.9, 1, 0.94, 0.96),
        _row("random", 0.9, 0, 0.50, 0.98), _row("random", 0.9, 1, 0.60, 0.96),
        _row("random", 0.5, 0, 0.95, 0.98), _row("random", 0.5, 1, 0.97, 0.96),
    ]
    summary = sweeper.summarise(rows)
    mag = summary["cells"][("global_norm", "magnitude", 0.9)]["accuracy"]
    assert mag.mean == pytest.approx(0.92) and mag.std == pytest.approx(0.0282843, rel=1e-5) and mag.n == 2
    dense = summary["dense"]["global_norm"]
    assert dense.mean == pytest.approx(0.97) and dense.n == 2
    text = sweeper.markdown(rows, load_config())
    assert "Dense baseline: **97.00 ± 1.41**" in text
    assert "| magnitude |  | **92.0 ± 2.8** |" in text  # no run at 50%; best at 90% in bold
    assert "| random | **96.0 ± 1.4** | 55.0 ± 7.1 |" in text
    assert "| 90% | 10.0x | 100 | 100 | 5,000 |" in text


def test_tradeoff_plot_is_a_png() -> None:
    from secateurs.experiment.sweep_plots import tradeoff_png

    rows = [_row(c, s, seed, 0.9 - s / 3, 0.97) for c in ("magnitude", "random") for s in (0.5, 0.9) for seed in (0, 1)]
    assert tradeoff_png(sweeper.summarise(rows)).startswith(b"\x89PNG\r\n\x1a\n")


def test_a_one_seed_sweep_shows_means_without_a_spread() -> None:
    rows = [_row("magnitude", 0.9, 0, 0.92, 0.97), _row("random", 0.9, 0, 0.55, 0.97)]
    text = sweeper.markdown(rows, load_config())
    assert "±" not in text
    assert "Dense baseline: **97.00**" in text and "| magnitude | **92.0** |" in text and "| random | 55.0 |" in text
    assert "one seed" in text


def test_the_zoom_panel_shows_only_what_its_title_says() -> None:
    from secateurs.experiment.sweep_plots import tradeoff_figure

    # dense 80%; one criterion 10 points above dense, one 20 points below (so the zoom panel is drawn)
    rows = [_row("magnitude", s, 0, 0.90, 0.80) for s in (0.5, 0.9)] + [_row("random", s, 0, 0.60, 0.80) for s in (0.5, 0.9)]
    fig = tradeoff_figure(sweeper.summarise(rows))
    zoom = fig.axes[1]
    low, high = zoom.get_ylim()
    assert zoom.get_title() == "zoom: the top 6 points, 84.0% to 90.0%"
    assert (low, high) == (pytest.approx(84.0), pytest.approx(90.5))
    shown = [y for line in zoom.get_lines() for y in line.get_ydata() if low <= y <= high and len(line.get_xdata()) > 1]
    assert shown and all(90.0 - 6 <= y <= 90.0 for y in shown)


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    sweeper.sweep(load_config(overrides=TINY), out, progress=False)
    return out


@pytest.mark.slow
def test_a_cell_started_from_the_shared_dense_run_counts_its_wall_time(tiny_sweep: Path) -> None:
    (dense,) = (tiny_sweep / "dense").iterdir()
    dense_seconds = json.loads((dense / "timing.json").read_text())["wall_seconds"]
    assert dense_seconds > 0
    for cell in (tiny_sweep / "cells").iterdir():
        assert json.loads((cell / "report.json").read_text())["wall_seconds"] > dense_seconds, cell.name


@pytest.mark.slow
def test_sweep_writes_csv_markdown_and_plot(tiny_sweep: Path) -> None:
    rows = _rows(tiny_sweep / "sweep.csv")
    assert [r["cell"] for r in rows] == ["magnitude-s0.8-seed0", "random-s0.8-seed0"]
    assert set(sweeper.CSV_COLUMNS) - set(TIMING) == set(rows[0])
    for row in rows:
        report = json.loads((tiny_sweep / "cells" / row["cell"] / "report.json").read_text())
        assert float(row["accuracy"]) == report["final"]["accuracy"]
        assert int(row["nonzero_params"]) == report["final"]["nonzero_params"]
        assert float(row["sparsity_reached"]) == pytest.approx(0.8, abs=1e-4)
    text = (tiny_sweep / "sweep.md").read_text()
    assert "| criterion | 80% |" in text and "Dense baseline:" in text
    assert (tiny_sweep / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_cell_equals_running_its_config_alone(tiny_sweep: Path, tmp_path: Path) -> None:
    """Starting from the shared dense checkpoint changes nothing, bit for bit."""
    cell = tiny_sweep / "cells" / "random-s0.8-seed0"
    alone = start(load_config(cell / "config.toml"), tmp_path / "alone", progress=False)
    assert_same_tensors(cell / "model.safetensors", tmp_path / "alone" / "model.safetensors")
    report = json.loads((cell / "report.json").read_text())
    assert report["history"] == alone["history"] and report["final"]["accuracy"] == alone["final"]["accuracy"]


@pytest.mark.slow
def test_rerun_keeps_finished_cells_and_runs_only_new_ones(tiny_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_sweep, out, copy_function=shutil.copy2)
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/report.json")}
    rows = sweeper.sweep(load_config(overrides=[*TINY, "sweep.sparsities=[0.8, 0.5]"]), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not one finished cell ran again
    assert sorted(r["cell"] for r in rows) == ["magnitude-s0.5-seed0", "magnitude-s0.8-seed0", "random-s0.5-seed0", "random-s0.8-seed0"]
    assert len(list((out / "dense").iterdir())) == 1  # the new cells reused the dense run


@pytest.mark.slow
def test_half_finished_cell_is_cleared_and_run_again(tiny_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_sweep, out)
    cell = out / "cells" / "magnitude-s0.8-seed0"
    for name in ("report.json", "model.safetensors", "report.md"):
        (cell / name).unlink()
    (cell / "checkpoint.safetensors").write_bytes(b"not a checkpoint")  # e.g. from another version
    sweeper.sweep(load_config(overrides=TINY), out, progress=False)
    assert_same_tensors(cell / "model.safetensors", tiny_sweep / "cells" / "magnitude-s0.8-seed0" / "model.safetensors")


@pytest.mark.slow
def test_other_base_config_in_the_same_folder_is_refused(tiny_sweep: Path) -> None:
    with pytest.raises(SecateursError, match=r"holds a sweep of another base config \(differs in prune.epochs\)"):
        sweeper.sweep(load_config(overrides=[*TINY, "prune.epochs=4"]), tiny_sweep, progress=False)


@pytest.mark.slow
def test_parallel_jobs_give_the_same_table(tiny_sweep: Path, tmp_path: Path) -> None:
    sweeper.sweep(load_config(overrides=TINY), tmp_path / "jobs", progress=False, jobs=2)
    assert _rows(tmp_path / "jobs" / "sweep.csv") == _rows(tiny_sweep / "sweep.csv")


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(tiny_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "secateurs", "sweep", *[a for o in TINY for a in ("--set", o)], "--quiet", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = out / "cells" / "random-s0.8-seed0" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not second.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run([sys.executable, "-m", "secateurs", "sweep", str(out / "sweep.toml"), "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _rows(out / "sweep.csv") == _rows(tiny_sweep / "sweep.csv")


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_with_a_resume_hint_that_works(tiny_sweep: Path, tmp_path: Path) -> None:
    script = str(Path(sys.executable).with_name("secateurs"))
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([script, "sweep", *[a for o in TINY for a in ("--set", o)], "--quiet", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    returncode, stderr = interrupt_once_written(proc, out / "cells" / "magnitude-s0.8-seed0" / "checkpoint.safetensors")
    if returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    lines = stderr.strip().splitlines()
    assert returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr
    hint = lines[0].split("resume with: ")[1].split()
    assert hint == ["secateurs", "sweep", str(out / "sweep.toml"), "--out", str(out)]
    again = subprocess.run([script, *hint[1:], "--quiet"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _rows(out / "sweep.csv") == _rows(tiny_sweep / "sweep.csv")


# --- bad input: exit 2 and one line ----------------------------------------------------------


BAD_INPUT = [
    (["--set", "data.name=imagenet"], "data.name: got 'imagenet'"),
    (["--set", "model.name=alexnet"], "model.name: got 'alexnet'"),
    (["--set", "model.name=no_such_package.models:build"], "the factory does not import"),
    (["--set", "data.name=mnist", "--set", "data.data_dir=/no/such/dir"], "data.data_dir: '/no/such/dir' does not exist"),
    (["--set", "data.name=cifar10"], "data.data_dir: got ''"),
]
SWEEP_ONLY = [
    (["--set", "sweep.seeds=[]"], "sweep.seeds: got []"),
    (["--set", "sweep.criteria=[]"], "sweep.criteria: got []"),
    (["--jobs", "0"], "--jobs: got 0"),
]


@pytest.mark.parametrize(
    ("command", "args", "needle"),
    [(c, a, n) for c in ("sweep", "sensitivity", "run") for a, n in BAD_INPUT] + [("sweep", a, n) for a, n in SWEEP_ONLY],
)
def test_bad_input_exits_2_with_one_line(command: str, args: list[str], needle: str, tmp_path: Path) -> None:
    result = _invoke(command, *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if command != "run":  # run writes config.toml before it builds the data and the model
        assert not (tmp_path / "out").exists()


def test_cli_exit_code_is_2_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "secateurs", "sweep", "--set", "sweep.sparsities=[]", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "secateurs: error: sweep.sparsities: got []; allowed: a non-empty list (every axis of the grid needs at least one value)"
