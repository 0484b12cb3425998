"""A new user's first hour (#17): an own model from the CLI, schedules that reach their target,
files others can read, identical bytes from identical runs, a fast start, Ctrl-C, and hints
that work when followed. Every command runs in a real process, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_in_process, interrupt_once_written, without_timing

from secateurs.experiment.config import load_config, to_toml

pytestmark = pytest.mark.slow

TINY = ["data.limit=200", "train.epochs=1", "prune.epochs=1", "prune.finetune_epochs=0"]


def _script() -> list[str]:
    """The ``secateurs`` console script of this interpreter (what the README tells users to run)."""
    script = Path(sys.executable).with_name("secateurs")
    assert script.is_file(), "the package is not installed with its console script"
    return [str(script)]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _secateurs(*args: str, cwd: Path | None = None, module: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "secateurs"] if module else _script()
    return subprocess.run([*argv, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --- 1. a model of your own -------------------------------------------------------------------

MYMODEL = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * h * w, num_classes))

    def forward(self, x):
        return self.body(x)


def tiny_net(*, input_shape, num_classes):
    return TinyNet(input_shape, num_classes)


class NoShape(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
'''


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mymodel.py").write_text(MYMODEL)
    return folder


@pytest.mark.parametrize("factory", ["TinyNet", "tiny_net"])
def test_a_class_or_a_function_in_the_current_folder_is_found_by_the_secateurs_script(user_folder: Path, factory: str) -> None:
    result = _secateurs("run", *_sets([*TINY, f"model.name=mymodel:{factory}"]), "--quiet", "--out", "out", cwd=user_folder)
    assert result.returncode == 0, result.stderr
    report = json.loads((user_folder / "out" / "report.json").read_text())
    assert report["model"] == f"mymodel:{factory}"
    # TinyNet on 1x8x8 digits: conv 1*8*9 + 8, linear 8*64*10 + 10
    assert report["dense"]["params"] == 8 * 9 + 8 + 8 * 64 * 10 + 10


def test_a_factory_with_the_wrong_signature_is_one_line_naming_it_and_its_arguments(user_folder: Path) -> None:
    result = _secateurs("run", *_sets([*TINY, "model.name=mymodel:NoShape"]), "--out", "out", cwd=user_folder)
    assert result.returncode == 2
    line = _one_line(result)
    assert line.startswith("secateurs: error: model.name: got 'mymodel:NoShape'; NoShape(num_classes) cannot be called as ")
    assert "NoShape(input_shape=(1, 8, 8), num_classes=10)" in line
    assert "allowed: a class or function called as factory(input_shape=" in line
    assert not (user_folder / "out").exists()


def test_the_factory_contract_is_in_run_help_and_the_readme() -> None:
    result = _secateurs("run", "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    assert "factory(input_shape=(C, H, W)" in flat and "must return an nn.Module" in flat
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "factory(input_shape=(C, H, W)" in readme and "returns an `nn.Module`" in readme


# --- 2. schedules that reach their target -----------------------------------------------------


def test_more_iterative_rounds_than_prune_epochs_is_refused_and_the_hint_reaches_the_target(tmp_path: Path) -> None:
    base = [*TINY, "prune.schedule=iterative", "prune.epochs=2", "prune.finetune_epochs=0"]
    refused = cli_in_process("run", *_sets(base), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2
    line = _one_line(refused)
    assert "prune.rounds: got 3 with prune.epochs = 2" in line and "target 0.9 would not be reached" in line
    assert not (tmp_path / "refused").exists()
    hint = line.split("(--set ")[1].split(",")[0]  # --set prune.rounds=2
    followed = _secateurs("run", *_sets(base), "--set", hint, "--quiet", "--out", str(tmp_path / "ok"))
    assert followed.returncode == 0, followed.stderr
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["prune"]["reached_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "target sparsity 0.9, reached 0.9000" in (tmp_path / "ok" / "report.md").read_text()


def test_a_pattern_with_a_sparsity_is_explained_and_the_layers_that_cannot_follow_it_are_named(tmp_path: Path) -> None:
    result = _secateurs("run", *_sets([*TINY, "prune.pattern=2:4", "prune.sparsity=0.7"]), "--quiet", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    # the seed CNN's weights and their input dimensions: only the first conv's (1 channel) is not a multiple of 4
    assert report["prune"]["pattern_misfits"] == {"features.0.weight": 1}
    text = " ".join((tmp_path / "o" / "report.md").read_text().split())
    assert "Pattern 2:4: at most 2 of every 4 weights along each layer's input dimension are kept (50.00% sparsity by itself), then pruned further to the target sparsity 0.7" in text
    assert "Cannot follow 2:4, their input dimension is not a multiple of 4: `features.0.weight` (input dimension 1)." in text
    help_text = " ".join(_secateurs("run", "--help").stdout.split())
    assert "prune.sparsity still applies on top" in help_text


# --- 3 and 4. files others can read, the same bytes from the same run --------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()



def test_two_identical_runs_write_identical_bytes_readable_under_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for name in ("a", "b"):
            result = _secateurs("run", *_sets([*TINY, "prune.epochs=2", "prune.finetune_epochs=1"]), "--quiet", "--out", str(tmp_path / name))
            assert result.returncode == 0, result.stderr
    finally:
        os.umask(old)
    a, b = tmp_path / "a", tmp_path / "b"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).stat().st_mode & 0o777 == 0o644, name
    for name in ("model.safetensors", "checkpoint.safetensors", "dense.safetensors", "config.toml", "accuracy.png", "grad_norm.png"):
        assert _sha(a / name) == _sha(b / name), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert without_timing(ra) == without_timing(rb)
    timed = ("| CPU latency", "Wall time:")
    ma, mb = ([line for line in (d / "report.md").read_text().splitlines() if not line.startswith(timed)] for d in (a, b))
    assert ma == mb
    assert set(json.loads((a / "timing.json").read_text())) == {"epoch", "wall_seconds", "latency_ms"}


# --- 5. start-up and Ctrl-C --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "sweep", "sensitivity"])
def test_a_bad_key_is_reported_before_torch_is_imported(command: str) -> None:
    probe = (
        "import sys\n"
        f"sys.argv = ['secateurs', '{command}', '--set', 'nosuch.key=1']\n"
        "from secateurs.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert "nosuch: unknown key" in _one_line(result)


def test_an_unknown_clip_method_is_still_reported_from_the_registry() -> None:
    result = _secateurs("run", "--set", "clip.method=nosuch")
    assert result.returncode == 2
    line = _one_line(result)
    assert "clip.method: got 'nosuch'" in line and "global_norm" in line


@pytest.mark.parametrize("moment", ["config.toml", "dense.safetensors", "model.safetensors"])
def test_ctrl_c_at_any_moment_is_exit_130_and_one_line(tmp_path: Path, moment: str) -> None:
    """Ctrl-C just after each of three files a run writes in turn. (Read off files, the moment
    cannot come after the end: the run still has its training, pruning or report ahead of it. A
    signal in the interpreter's own start-up, before secateurs runs, is Python's to handle.)"""
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [*_script(), "run", *_sets(TINY), "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    returncode, stderr = interrupt_once_written(proc, out / moment)
    assert returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateurs: interrupted"), stderr


# --- 7. hints that work when followed ----------------------------------------------------------


def test_a_folder_of_ones_own_files_is_refused_without_a_resume_hint(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    line = _one_line(cli_in_process("run", *_sets(TINY), "--out", str(mine)))
    assert "is not empty; allowed: a new or empty folder" in line and "--resume" not in line
    resumed = cli_in_process("run", "--resume", str(mine))
    assert resumed.returncode == 2
    assert "not the folder of a secateurs run" in _one_line(resumed)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_resume_of_a_missing_folder_says_it_does_not_exist(tmp_path: Path) -> None:
    result = cli_in_process("run", "--resume", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert f"--resume: {str(tmp_path / 'nowhere')!r} does not exist" in _one_line(result)


def test_the_resume_hint_for_a_run_stopped_before_its_first_epoch_works(tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "config.toml").write_text(to_toml(load_config(overrides=TINY)))  # what a run stopped that early leaves
    line = _one_line(cli_in_process("run", *_sets(TINY), "--out", str(out)))
    assert "holds an unfinished run" in line
    hint = line.split("continue that run with: ")[1].split()
    assert hint[:3] == ["secateurs", "run", "--resume"]
    followed = subprocess.run([*_script(), *hint[1:], "--quiet"], capture_output=True, text=True, timeout=600)
    assert followed.returncode == 0, followed.stderr
    assert (out / "report.json").is_file()
    finished = _one_line(cli_in_process("run", *_sets(TINY), "--out", str(out)))
    assert "holds a finished run; allowed: a new or empty folder" in finished


# --- 9. threads ---------------------------------------------------------------------------------


def test_the_readme_says_how_many_threads_and_the_quick_start_sets_one() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    quick_start = readme.split("## Quick start in Python")[1].split("```python")[1].split("```")[0]
    assert "torch.set_num_threads(1)" in quick_start
    note = " ".join(readme.split("**Threads**")[1].split("\n\n")[0].split())
    assert "train.threads" in note and "18x slower" in note and "torch.set_num_threads(1)" in note
