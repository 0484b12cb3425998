"""Nothing lost, nothing executed: resume after SIGKILL, Ctrl-C, pickles refused, bad outputs."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_RUN, cli_in_process, without_timing
from safetensors.torch import load_file

pytestmark = pytest.mark.slow



def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, timeout=600)


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "secateurs", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)



def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- a kill at any moment, at fixed points -------------------------------------------------------
#
# The run is killed (SIGKILL, sent by the process to itself) at a named write, the n-th time its
# file is renamed into place (every write is atomic: a temporary file, then os.replace). The
# point is fixed by what the folder holds, not by a delay that would land elsewhere on every
# machine and load. "before" kills just ahead of the rename: the temporary file is left over.
KILL_AT = r"""
import os, signal, sys
name, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
del sys.argv[1:4]
_replace, seen = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(os.fspath(dst)) == name
    seen[0] += hit
    if hit and seen[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(src, dst, *args, **kwargs)
    if hit and seen[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
sys.argv[0] = "secateurs"
from secateurs.cli import main
main()
"""

# QUICK_RUN is 3 dense, 3 prune and 2 fine-tuning epochs, one checkpoint after each; structured
# rounds write a shape side file (structure-EEEE) before the checkpoint that names it.
#
# One run of each kind is killed again and again, each time at the next point, every process
# continuing from what the one before left; then it must equal the uninterrupted run. A kill's
# count is per process: the resume that starts at checkpoint 5 is killed during its 3rd write,
# the 7th checkpoint of the run. Each state on the way is checked as a user would meet it.
# (command, (file, "before"/"after" its rename, n-th rename in this process), what the folder holds)
UNSTRUCTURED_KILLS = [
    ("fresh", ("config.toml", "before", 1), "nothing but a temporary file"),
    ("fresh", ("config.toml", "after", 1), "config.toml, nothing else"),
    ("resume", ("checkpoint.safetensors", "after", 4), "4 checkpoints (pruning)"),
    ("resume", ("checkpoint.safetensors", "before", 3), "the 7th checkpoint half written (fine-tuning)"),
    ("resume", ("model.safetensors", "after", 1), "the final model, no report"),
    ("resume", ("report.json", "after", 1), "report.json"),
]
STRUCTURED_KILLS = [
    ("fresh", ("structure-0005.safetensors", "after", 1), "a shape side file, its checkpoint not"),
    ("resume", ("report.json", "after", 1), "report.json"),
]
_TIMED_FILES = ("report.json", "report.md", "timing.json")


def _args_of(kind: str) -> list[str]:
    return [*_set_args([*QUICK_RUN, f"prune.kind={kind}", "prune.sparsity=0.5" if kind == "structured" else "seed=0"]), "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted run of each kind, made once per module (on first use)."""

    class Runs(dict):  # type: ignore[type-arg]
        def __missing__(self, kind: str) -> Path:
            out = tmp_path_factory.mktemp("whole") / kind
            result = _cli("run", *_args_of(kind), "--out", str(out))
            assert result.returncode == 0, result.stderr
            self[kind] = out
            return out

    return Runs()


def _untimed_md(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith(("| CPU latency", "Wall time:"))]


def assert_same_run(got: Path, want: Path) -> None:
    """The same files with the same bytes; the reports equal but for their timings."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for path in want.iterdir():
        if path.name not in _TIMED_FILES:
            assert (got / path.name).read_bytes() == path.read_bytes(), path.name
    a, b = (json.loads((d / "report.json").read_text()) for d in (got, want))
    assert without_timing(a) == without_timing(b)
    assert _untimed_md(got / "report.md") == _untimed_md(want / "report.md")


def _killed(kill: tuple[str, str, int], out: Path, *args: str) -> list[str]:
    """Run the CLI with ``args`` until the kill point; the names in ``out`` afterwards."""
    name, when, nth = kill
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, name, when, str(nth), *args], capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_a_run_killed_at_fixed_points_in_turn_is_continued_to_the_uninterrupted_result(
    tmp_path: Path, kind: str, uninterrupted: dict[str, Path]
) -> None:
    out = tmp_path / "killed"
    args = _args_of(kind)
    for command, kill, state in UNSTRUCTURED_KILLS if kind == "unstructured" else STRUCTURED_KILLS:
        cli = ["run", *args, "--out", str(out)] if command == "fresh" else ["run", "--resume", str(out), "--quiet"]
        left = _killed(kill, out, *cli)
        name, when, _ = kill
        assert name in left or (when == "before" and any(n.startswith(f".{name}.") and n.endswith(".tmp") for n in left)), (state, left)
        if "config.toml" not in left:
            # Nothing says which config it was: --resume says how to start again (the next
            # fresh run in the list follows that advice: only temporary files count as empty)
            refused = cli_in_process("run", "--resume", str(out))
            assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, (state, refused.stderr)
            assert "stopped before it wrote its config" in refused.stderr
            assert f"secateurs run CONFIG --out {out}" in refused.stderr
        elif "report.json" not in left:
            # --out on the folder of an unfinished run: one line naming the command that continues it
            refused = cli_in_process("run", *args, "--out", str(out))
            assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, (state, refused.stderr)
            assert f"continue that run with: secateurs run --resume {out}" in refused.stderr
            assert sorted(p.name for p in out.iterdir()) == left, state  # nothing touched
    # killed just after its report: finished, and --resume is a no-op
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if not p.name.startswith("structure-")}
    resumed = _cli("run", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "holds a finished run" in resumed.stderr and "nothing was run again" in resumed.stderr
    # every file as it was (a structured run's last shape file, which the kill kept from being
    # removed, is gone)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert_same_run(out, uninterrupted[kind])


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _popen("run", *_set_args(QUICK_RUN), "--quiet", "--out", str(out))
    _wait_for(out / "checkpoint.safetensors", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130
    assert f"secateurs run --resume {out}" in stderr
    assert "Traceback" not in stderr
    resumed = _cli("run", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr


class _PlantsAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_by_inspect_and_resume(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state": _PlantsAFile(marker)}))
    result = cli_in_process("inspect", str(evil))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    (run_dir / "checkpoint.safetensors").write_bytes(evil.read_bytes())
    result = cli_in_process("run", "--resume", str(run_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.safetensors", "config.toml"]


def test_corrupted_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _cli("run", *_set_args([*QUICK_RUN, "train.epochs=1", "prune.kind=none"]), "--quiet", "--out", str(out)).returncode == 0
    (out / "report.json").unlink()  # as if the run had been killed before it finished
    ckpt = out / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = cli_in_process("run", "--resume", str(out))
    assert result.returncode == 2 and "corrupted" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _nan_dataset(path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, y_train = x[:1400].copy(), y[:1400]
    x_train[::350] = np.nan  # four poisoned examples: a few batches per epoch
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x[1400:], y_test=y[1400:])


def test_nonfinite_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    data = tmp_path / "poisoned.npz"
    _nan_dataset(data)
    out = tmp_path / "run"
    result = _cli("run", *_set_args([f"data.name={json.dumps(str(data))}", "train.epochs=3", "prune.kind=none"]), "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["clip"]["skipped_steps"] <= 3 * 4
    weights = load_file(str(out / "model.safetensors"))
    assert all(bool(torch.isfinite(t.float()).all()) for t in weights.values())
    assert report["final"]["accuracy"] > 0.5  # chance is 0.1: the skipped steps did not poison the weights  # the skipped steps did not poison the weights


def test_nonfinite_error_names_epoch_and_step_and_keeps_files(tmp_path: Path) -> None:
    data = tmp_path / "poisoned.npz"
    _nan_dataset(data)
    out = tmp_path / "run"
    result = _cli("run", *_set_args([f"data.name={json.dumps(str(data))}", "train.epochs=2", "prune.kind=none", "train.nonfinite=error"]), "--quiet", "--out", str(out))
    assert result.returncode == 2
    assert "epoch 1" in result.stderr and "step" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (out / "config.toml").is_file()


def test_unwritable_output_is_reported_without_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = cli_in_process("run", "--out", str(blocker / "sub"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_non_empty_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = cli_in_process("run", "--out", str(out))
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (out / "report.json").read_text() == "{}"


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_is_reported_in_one_line_and_corrupts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # The epoch checkpoint (about 1 MB) is the first file over 200 kB: its write fails as on a full disk.
    result = subprocess.run(
        [sys.executable, "-m", "secateurs", "run", *_set_args([*QUICK_RUN, "train.epochs=1"]), "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "cannot write" in result.stderr and "checkpoint.safetensors" in result.stderr
    assert [p.name for p in out.iterdir()] == ["config.toml"]  # no half-written file is left
    assert (out / "config.toml").read_text().startswith("seed = 0")
