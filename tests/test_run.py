"""End to end: `secateurs run` on digits writes every file with the promised schema."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, assert_same_tensors
from safetensors import safe_open

from secateurs import prune
from secateurs.experiment.config import load_config
from secateurs.experiment.models import build_model
from secateurs.experiment.run import Run, start
from secateurs.experiment.train import cross_entropy

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "out"
    report = start(load_config(overrides=QUICK_RUN), out, progress=False)
    return out, report


def test_run_zeroes_pruned_gradients_before_the_clip_rule(tmp_path: Path) -> None:
    run = Run(load_config(overrides=QUICK_RUN), tmp_path / "out", progress=False)
    assert run.pruner is not None
    run.pruner.step(0.5)
    run.optimizer.zero_grad()
    cross_entropy(run.model(run.data.train.x[:64]), run.data.train.y[:64]).backward()
    masks = run.pruner.masks
    masked = [p.grad * masks[n] if n in masks else p.grad for n, p in run.model.named_parameters()]
    want = torch.nn.utils.get_total_norm(masked).item()
    full = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters()]).item()
    run.optimizer.step()
    assert run.log.norms() == [pytest.approx(want, rel=1e-6)]
    assert want < full


def test_run_writes_every_promised_file(quick_run: tuple[Path, dict]) -> None:
    out, _ = quick_run
    for name in ("report.json", "report.md", "accuracy.png", "grad_norm.png", "model.safetensors", "config.toml"):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_schema_and_value_ranges(quick_run: tuple[Path, dict]) -> None:
    out, _ = quick_run
    report = json.loads((out / "report.json").read_text())
    assert (report["dataset"], report["model"], report["seed"]) == ("digits", "seed-cnn", 0)
    for key in ("accuracy", "params", "checkpoint_bytes", "macs", "latency_ms"):
        assert key in report["dense"], key
    for key in ("accuracy", "sparsity", "nonzero_params", "checkpoint_bytes", "macs", "latency_ms"):
        assert key in report["final"], key
    assert 0 <= report["dense"]["accuracy"] <= 1 and 0 <= report["final"]["accuracy"] <= 1
    assert report["clip"]["method"] == "global_norm"
    assert 0 <= report["clip"]["clipped_steps"] <= report["clip"]["total_steps"]
    # data.limit=600 leaves 510 training examples: 8 epochs of ceil(510 / 64) steps
    assert report["clip"]["total_steps"] == 8 * math.ceil(510 / 64)
    assert (report["prune"]["criterion"], report["prune"]["schedule"]) == ("magnitude", "agp")
    assert report["wall_seconds"] > 0


def test_reported_sparsity_matches_the_saved_weights(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    model = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)
    prune.load(out / "model.safetensors", model)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert report["final"]["sparsity"] == pytest.approx(zeros / total)
    assert report["final"]["sparsity"] >= 0.89
    assert report["final"]["nonzero_params"] == sum(int(p.count_nonzero()) for p in model.parameters())


def test_saved_model_is_sparse_and_smaller(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    assert report["final"]["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert report["final"]["checkpoint_bytes"] <= 0.25 * report["dense"]["checkpoint_bytes"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()  # the sparse format describes itself


def test_config_toml_repeats_the_run(quick_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, report = quick_run
    again = start(load_config(out / "config.toml"), tmp_path / "again", progress=False)
    assert again["final"]["accuracy"] == report["final"]["accuracy"]
    assert_same_tensors(out / "model.safetensors", tmp_path / "again" / "model.safetensors")


def test_report_md_has_before_after_and_per_layer_tables(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    text = (out / "report.md").read_text()
    assert "| test accuracy |" in text and "## Per-layer sparsity" in text
    assert "features.0" in text
    layers = report["prune"]["layers"]
    # the MACs left if zeros were skipped: every layer's dense MACs times its density
    kept = sum(row["flops"] * (1 - row["sparsity"]) for row in layers["layers"])
    assert layers["sparse_flops"] == pytest.approx(layers["flops"] - sum(r["flops"] for r in layers["layers"]) + kept, abs=len(layers["layers"]))
    assert 0 < layers["sparse_flops"] < layers["flops"] == report["final"]["macs"]
    assert f"| MACs if zero weights were skipped | {report['dense']['macs']:,} | {layers['sparse_flops']:,} |" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "prune.sparsity=1.5"], "prune.sparsity: got 1.5"),
        (["--set", "train.epochs=-1"], "train.epochs: got -1"),
        (["--set", "prune.criterion=nonsense"], "prune.criterion: got 'nonsense'"),
        (["does/not/exist.toml"], "does not exist"),
        (["--set", "no_such.key=1"], "no_such: unknown key"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    result = _cli("run", *args, "--out", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_toml_syntax_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    result = _cli("run", str(bad))
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_help_lists_config_keys() -> None:
    result = _cli("run", "--help")
    assert result.returncode == 0
    for key in ("prune.sparsity", "clip.method", "train.epochs", "data.name"):
        assert key in result.stdout


def test_clipping_decides_the_sequence_example(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "sequence-clip.toml"
    clipped = start(load_config(example), tmp_path / "clip", progress=False)
    unclipped = start(load_config(example, ["clip.method=none"]), tmp_path / "none", progress=False)
    assert clipped["clip"]["clipped_steps"] > 0
    assert unclipped["final"]["accuracy"] < 0.4  # chance is 0.25: the exploding RNN does not learn
    assert clipped["final"]["accuracy"] > 0.85


def test_default_job_meets_its_bar(tmp_path: Path) -> None:
    report = start(load_config(), tmp_path / "default", progress=False)
    assert report["dense"]["accuracy"] >= 0.97
    assert report["final"]["accuracy"] >= 0.95
    assert report["final"]["sparsity"] >= 0.89
    assert report["final"]["checkpoint_bytes"] <= 0.25 * report["dense"]["checkpoint_bytes"]


@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_a_threshold_run_prunes_what_scores_below_it_and_reports_what_it_reached(tmp_path: Path, kind: str) -> None:
    threshold = 0.05 if kind == "unstructured" else 0.7  # |w| of one weight; sum w^2 of a channel's weights
    overrides = [*QUICK_RUN, f"prune.kind={kind}", "prune.schedule=oneshot", f"prune.threshold={threshold}"]
    run = Run(load_config(overrides=overrides), tmp_path / "out", progress=False)
    assert run.schedule is not None and run.schedule.name == "oneshot"
    report = start(load_config(overrides=overrides), tmp_path / "run", progress=False)
    p = report["prune"]
    assert (p["threshold"], p["target_sparsity"]) == (threshold, None)
    if kind == "unstructured":
        model = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)
        prune.load(tmp_path / "run" / "model.safetensors", model)
        weights = [t.param for t in prune.find_targets(model)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert p["reached_sparsity"] == pytest.approx(zeros) == pytest.approx(report["final"]["sparsity"])
        # every kept weight was at least the threshold when it was pruned; fine-tuning moves them after
        assert 0 < zeros < 1
    else:
        assert 0 < p["reached_sparsity"] < 1
        assert report["final"]["params"] < report["dense"]["params"]
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"threshold {threshold}, reached {p['reached_sparsity']:.4f}" in text


# --- #17: report polish ------------------------------------------------------------------------

TINY = ["data.limit=200", "train.epochs=1", "prune.epochs=1", "prune.finetune_epochs=1"]


def test_a_structured_run_shows_the_channels_removed_on_its_prune_and_finetune_rows(tmp_path: Path) -> None:
    overrides = [*TINY, "prune.kind=structured", "prune.sparsity=0.5", "prune.rounds=1"]
    report = start(load_config(overrides=overrides), tmp_path / "s", progress=False)
    reached = report["prune"]["reached_sparsity"]
    assert 0.4 < reached <= 0.5
    by_phase = {row["phase"]: row["sparsity"] for row in report["history"]}
    assert by_phase == {"dense": 0.0, "prune": pytest.approx(reached), "finetune": pytest.approx(reached)}
    text = (tmp_path / "s" / "report.md").read_text()
    assert "x fewer |" in text.split("| MACs |")[1].splitlines()[0]  # the smaller model has fewer MACs


def test_unchanged_macs_read_same_not_1x_fewer(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    assert report["dense"]["macs"] == report["final"]["macs"]  # masks leave the dense kernels' MACs
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| MACs |"))
    assert row == f"| MACs | {report['dense']['macs']:,} | {report['final']['macs']:,} | same |"


def test_history_rows_count_the_optimizer_steps_and_grad_norm_png_shades_the_phases(quick_run: tuple[Path, dict]) -> None:
    from matplotlib.patches import Polygon, Rectangle

    from secateurs import clip
    from secateurs.experiment.plots import grad_norm_figure

    _, report = quick_run
    per_epoch = math.ceil(510 / 64)  # data.limit=600 leaves 510 training examples
    assert [row["steps"] for row in report["history"]] == [per_epoch * (i + 1) for i in range(len(report["history"]))]
    log = clip.ClipLog()
    fig = grad_norm_figure(log, report["history"])
    ax = fig.axes[0]
    spans = sorted(round(p.get_xy()[0][0] if isinstance(p, Polygon) else p.get_x(), 1) for p in ax.patches if isinstance(p, (Polygon, Rectangle)))
    # QUICK_RUN: 3 dense, 3 prune, 2 fine-tune epochs
    assert spans == [0.5, 3 * per_epoch + 0.5, 6 * per_epoch + 0.5]
    assert [t.get_text() for t in ax.texts] == ["dense", "prune", "finetune"]


def test_the_wall_time_counts_from_the_given_start(tmp_path: Path) -> None:
    import time

    report = start(load_config(overrides=[*TINY, "prune.kind=none"]), tmp_path / "w", progress=False, started=time.perf_counter() - 100.0)
    assert 100.0 < report["wall_seconds"] < 400.0


def test_the_cli_counts_its_wall_time_from_the_process_start() -> None:
    import time

    before = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process on Linux
    probe = "import secateurs.cli as c; print(repr(c._STARTED))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    after = time.perf_counter()
    started = float(done.stdout)
    assert before - 0.05 <= started <= after
    assert started - before < 0.25 * (after - before) + 0.03  # at the process start, not at the end of the imports
