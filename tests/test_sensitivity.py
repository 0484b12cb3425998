"""`secateurs sensitivity`: per-layer curves, the per-layer sparsity search, and per_layer.toml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from secateurs import prune
from secateurs.cli import app
from secateurs.experiment.config import load_config
from secateurs.experiment.data import load_dataset
from secateurs.experiment.models import build_model
from secateurs.experiment.run import start
from secateurs.experiment.sensitivity import Probe, layer_keys, per_layer_config, search, set_option

# Enough dense training for the digits CNN to be well above chance, still a few seconds.
DENSE = ["train.epochs=6", "data.limit=800", "train.threads=1"]


def test_layers_are_named_by_module_or_by_parameter_where_a_module_has_several() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8), nn.Linear(8, 2))
    keys = [layer.key for layer in layer_keys(prune.find_targets(model))]
    assert keys == ["0", "1.weight_ih_l0", "1.weight_hh_l0", "2"]


def test_per_layer_config_is_a_run_config_with_the_allocation() -> None:
    cfg = per_layer_config(load_config(), {"features.0": 0.1, "classifier.3": 0.55556}, 0.90001)
    assert cfg.prune.per_layer == {"features.0": 0.1, "classifier.3": 0.5556}
    assert cfg.prune.sparsity == 0.9
    assert set_option({"features.0": 0.1}, 0.9) == "--set 'prune.per_layer={\"features.0\" = 0.1}' --set prune.sparsity=0.9"


@pytest.fixture(scope="module")
def probe() -> Probe:
    cfg = load_config(overrides=DENSE)
    torch.set_num_threads(1)
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model("seed-cnn", input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from secateurs.experiment.data import batches
    from secateurs.experiment.train import train_epoch

    for epoch in range(cfg.train.epochs):
        train_epoch(model, optimizer, batches(data.train, 64, seed=epoch))
    return Probe(cfg, model, data)


@pytest.mark.slow
def test_curve_prunes_only_that_layer(probe: Probe) -> None:
    rows = probe.curves([0.5, 0.9])
    assert len(rows) == 2 * len(probe.layers)
    ev = probe.evaluate(per_layer={"features.3": 0.9})
    assert ev.layers["features.3"] == pytest.approx(0.9, abs=1e-3)
    assert all(s == 0 for key, s in ev.layers.items() if key != "features.3")
    assert probe.model.features[3].weight.count_nonzero() == round(0.1 * 18432)


@pytest.mark.slow
def test_search_reaches_the_target_and_beats_uniform_layer_wise(probe: Probe) -> None:
    alloc, found, trace = search(probe, goal="target", target=0.9, budget=0.01)
    assert found.sparsity == pytest.approx(0.9, abs=1e-3)
    assert all(0 <= s < 1 for s in alloc.values()) and trace
    uniform = probe.evaluate(sparsity=found.sparsity, scope="layer")
    assert found.val_accuracy > uniform.val_accuracy + 0.05


@pytest.mark.slow
def test_highest_goal_stays_within_the_budget(probe: Probe) -> None:
    _, found, _ = search(probe, goal="highest", target=0.9, budget=0.02)
    assert probe.dense.val_accuracy - found.val_accuracy <= 0.02
    assert found.sparsity > 0.5


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sensitivity") / "out"
    args = [a for o in [*DENSE, "sensitivity.sparsities=[0.5, 0.9]", "sensitivity.target=0.8"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["sensitivity", *args, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "per-layer sparsities reach 80.0% overall" in result.stdout
    return out


@pytest.mark.slow
def test_command_writes_curves_plot_search_and_per_layer_toml(analysed: Path) -> None:
    for name in ("sensitivity.csv", "sensitivity.png", "sensitivity.md", "search.json", "per_layer.toml", "dense/report.json"):
        assert (analysed / name).is_file(), name
    result = json.loads((analysed / "search.json").read_text())
    assert set(result["per_layer"]) == {"features.0", "features.3", "features.6", "classifier.1", "classifier.3"}
    assert result["uniform"]["sparsity"] == pytest.approx(result["search"]["sparsity"], abs=1e-3)
    assert "| searched per-layer | 80.0% |" in (analysed / "sensitivity.md").read_text()


@pytest.mark.slow
def test_run_accepts_per_layer_toml_and_reaches_each_layer_sparsity(analysed: Path, tmp_path: Path) -> None:
    cfg = load_config(analysed / "per_layer.toml", ["train.epochs=1", "prune.epochs=2", "prune.finetune_epochs=1", "data.limit=300", "train.threads=1"])
    report = start(cfg, tmp_path / "run", progress=False)
    wanted = cfg.prune.per_layer
    reached = {layer["name"]: layer["sparsity"] for layer in report["prune"]["layers"]["layers"]}
    for key, sparsity in wanted.items():
        assert reached[f"{key}.weight"] == pytest.approx(sparsity, abs=1e-3), key
    assert report["final"]["sparsity"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.slow
def test_rerun_reuses_the_dense_model(analysed: Path) -> None:
    before = (analysed / "dense" / "report.json").stat().st_mtime_ns
    args = [a for o in [*DENSE, "sensitivity.sparsities=[0.5, 0.9]", "sensitivity.target=0.8"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["sensitivity", *args, "--quiet", "--out", str(analysed)])
    assert result.exit_code == 0, result.output
    assert (analysed / "dense" / "report.json").stat().st_mtime_ns == before


def test_structured_kind_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sensitivity", "--set", "prune.kind=structured", "--set", "prune.criterion=magnitude", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "prune.kind: got 'structured'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_probe_list_is_refused() -> None:
    from secateurs.errors import SecateursError

    with pytest.raises(SecateursError, match=r"sensitivity.sparsities: got \[\]"):
        load_config(overrides=["sensitivity.sparsities=[]"])



@pytest.mark.slow
def test_folder_with_a_dense_model_of_another_config_is_refused(analysed: Path) -> None:
    result = CliRunner().invoke(app, ["sensitivity", "--set", "model.name=mlp", *[a for o in DENSE for a in ("--set", o)], "--quiet", "--out", str(analysed)])
    assert result.exit_code == 2
    assert "holds a finished run of another config" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_during_the_dense_run_gives_a_resume_hint_that_works(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import interrupt_once_written

    script = str(Path(sys.executable).with_name("secateurs"))
    out = tmp_path / "sens"
    keys = [*DENSE, "train.epochs=12", "sensitivity.sparsities=[0.5, 0.9]"]
    proc = subprocess.Popen([script, "sensitivity", *[a for k in keys for a in ("--set", k)], "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    returncode, stderr = interrupt_once_written(proc, out / "dense" / "checkpoint.safetensors")
    lines = stderr.strip().splitlines()
    assert returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr
    hint = lines[0].split("resume with: ")[1].split()
    assert hint == ["secateurs", "sensitivity", str(out / "config.toml"), "--out", str(out)]
    again = subprocess.run([script, *hint[1:], "--quiet"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert (out / "per_layer.toml").is_file()
    report = json.loads((out / "dense" / "report.json").read_text())
    assert len(report["history"]) == 12  # the dense run went on from its checkpoint to the last epoch
