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
from conftest import QUICK_RUN, assert_same_tensors, without_timing
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


def _wait_for_writes(path: Path, proc: subprocess.Popen[str], writes: int, timeout: float = 300) -> None:
    """Wait until ``path`` has been written ``writes`` times (each save replaces the file)."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[int, int, int]] = []
    while len(seen) < writes:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        try:
            st = path.stat()
        except FileNotFoundError:
            pass
        else:
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
            if not seen or seen[-1] != version:
                seen.append(version)
        time.sleep(0.01)


# Kill points fixed by progress, not by time: right after the n-th checkpoint (one per epoch of
# QUICK_RUN's 3 training, 3 pruning, 2 fine-tuning epochs): in dense training for one kind, in
# the pruning epochs for the other. A delay would land elsewhere on every machine and load.
@pytest.mark.parametrize(("kind", "checkpoints"), [("unstructured", 2), ("structured", 4)])
def test_sigkill_after_a_fixed_checkpoint_then_resume_gives_identical_results(
    tmp_path: Path, kind: str, checkpoints: int
) -> None:
    args = [*_set_args([*QUICK_RUN, f"prune.kind={kind}", "prune.sparsity=0.5" if kind == "structured" else "seed=0"]), "--quiet"]
    whole = _cli("run", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    proc = _popen("run", *args, "--out", str(killed))
    _wait_for_writes(killed / "checkpoint.safetensors", proc, checkpoints)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _cli("run", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    assert_same_tensors(killed / "model.safetensors", tmp_path / "whole" / "model.safetensors")
    a = json.loads((killed / "report.json").read_text())
    b = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert without_timing(a) == without_timing(b)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


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
    result = _cli("inspect", str(evil))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    (run_dir / "checkpoint.safetensors").write_bytes(evil.read_bytes())
    result = _cli("run", "--resume", str(run_dir))
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
    result = _cli("run", "--resume", str(out))
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
    result = _cli("run", "--out", str(blocker / "sub"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_non_empty_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = _cli("run", "--out", str(out))
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
