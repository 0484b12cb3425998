"""``train.device``: which device a value names on a given machine, and a run living on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_RUN, cli_in_process, without_timing
from safetensors.torch import load_file

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.experiment.config import load_config
from secateurs.experiment.models import build_model
from secateurs.experiment.run import Run
from secateurs.experiment.train import accuracy, resolve_device, run_device
from secateurs.serialization import load_state

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
TINY = [*QUICK_RUN, "train.epochs=1", "prune.epochs=1", "prune.finetune_epochs=1"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, timeout=600)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --- resolution, the machine passed in ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cuda_count", "mps", "local_rank", "want"),
    [
        ("auto", 0, False, 0, "cpu"),
        ("auto", 0, True, 0, "mps"),
        ("auto", 2, True, 0, "cuda:0"),  # CUDA before MPS
        ("auto", 2, False, 1, "cuda:1"),  # under torchrun: this process's own GPU
        ("cpu", 4, True, 0, "cpu"),
        ("cuda", 1, False, 0, "cuda:0"),
        ("cuda", 4, False, 3, "cuda:3"),
        ("cuda:1", 2, False, 0, "cuda:1"),
        ("cuda:0", 2, False, 1, "cuda:0"),  # an explicit index is taken as given
        ("mps", 0, True, 0, "mps"),
    ],
)
def test_resolve_device_on_a_described_machine(value: str, cuda_count: int, mps: bool, local_rank: int, want: str) -> None:
    assert resolve_device(value, cuda_count=cuda_count, mps=mps, local_rank=local_rank) == torch.device(want)


@pytest.mark.parametrize(
    ("value", "cuda_count", "mps", "local_rank", "says"),
    [
        ("cuda", 0, False, 0, "this machine has no CUDA device"),
        ("cuda:0", 0, True, 0, "this machine has no CUDA device"),
        ("cuda:2", 2, False, 0, "which is GPU 2, but this machine has 2 CUDA device(s)"),
        ("cuda", 2, False, 2, "LOCAL_RANK 2"),
        ("auto", 1, False, 1, "LOCAL_RANK 1"),  # more processes than GPUs: say so rather than share one
        ("mps", 1, False, 0, "this machine has no MPS device"),
        ("gpu", 1, True, 0, "allowed: auto, cpu, cuda, cuda:N"),
        ("cuda:x", 1, False, 0, "allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_a_device_the_machine_lacks_is_an_error_naming_key_value_and_what_is_allowed(
    value: str, cuda_count: int, mps: bool, local_rank: int, says: str
) -> None:
    with pytest.raises(SecateursError) as err:
        resolve_device(value, cuda_count=cuda_count, mps=mps, local_rank=local_rank)
    message = str(err.value)
    assert message.startswith(f"train.device: got {value!r}") and says in message and "allowed" in message
    assert "\n" not in message


def test_the_error_lists_what_this_described_machine_allows() -> None:
    with pytest.raises(SecateursError, match=r"allowed on this machine: auto, cpu, cuda, cuda:0 to cuda:1, mps$"):
        resolve_device("cuda:5", cuda_count=2, mps=True)
    with pytest.raises(SecateursError, match=r"allowed on this machine: auto, cpu$"):
        resolve_device("cuda", cuda_count=0, mps=False)


@pytest.mark.skipif(HAS_CUDA or HAS_MPS, reason="this machine has a CUDA (or MPS) GPU, which auto takes")
def test_auto_resolves_to_the_cpu_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    assert run_device("auto") == torch.device("cpu")
    run = Run(load_config(overrides=TINY), tmp_path / "out", progress=False)
    assert run.device == torch.device("cpu")
    assert {p.device for p in run.model.parameters()} == {torch.device("cpu")}


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA; the error is for one without")
def test_cuda_on_a_machine_without_it_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli_in_process("run", *_sets([*TINY, "train.device=cuda"]), "--quiet", "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.device: got 'cuda'" in lines[0] and "no CUDA device" in lines[0], result.stderr
    assert not out.exists()


# --- whole runs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_cpu_equals_the_default_run_here(tmp_path: Path) -> None:
    default, cpu = tmp_path / "default", tmp_path / "cpu"
    for out, extra in ((default, []), (cpu, ["train.device=cpu"])):
        result = cli_in_process("run", *_sets([*TINY, *extra]), "--quiet", "--out", str(out))
        assert result.returncode == 0, result.stderr
    a, b = (json.loads((d / "report.json").read_text()) for d in (default, cpu))
    assert 'device = "cpu"' in (cpu / "config.toml").read_text() and 'device = "auto"' in (default / "config.toml").read_text()
    if HAS_CUDA or HAS_MPS:  # auto took the GPU: the CPU run is the other one
        assert a["device"] != "cpu" and b["device"] == "cpu"
        return
    assert (a["device"], b["device"]) == ("cpu", "cpu")
    for name in ("model.safetensors", "dense.safetensors", "checkpoint.safetensors", "accuracy.png", "grad_norm.png"):
        assert (cpu / name).read_bytes() == (default / name).read_bytes(), name
    assert without_timing(a) == without_timing(b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_a_run_on_cuda_lives_there_and_its_files_load_on_the_cpu(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, "train.device=cuda"])
    run = Run(cfg, tmp_path / "unit", progress=False)
    run.run_epoch()  # dense
    run.run_epoch()  # prune: masks, scores
    cuda = torch.device("cuda", 0)
    assert run.device == cuda and run.example.device == cuda
    assert {p.device for p in run.model.parameters()} == {cuda}
    assert run.pruner is not None and {m.device for m in run.pruner.masks.values()} == {cuda}
    states = [v for s in run.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    assert states and {v.device for v in states} == {cuda}

    out = tmp_path / "cli"
    result = _cli("run", *_sets([*TINY, "train.device=cuda"]), "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cuda:0"
    assert {t.device.type for t in load_file(str(out / "model.safetensors")).values()} <= {"cpu"}
    tree = load_state(out / "checkpoint.safetensors")  # CPU tensors
    assert {t.device.type for t in tree["model"].values()} == {"cpu"}
    data = Run(load_config(overrides=[*TINY, "train.device=cpu"]), tmp_path / "cpu", progress=False).data
    model = build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes)
    prune.load(out / "model.safetensors", model)  # the GPU run's weights, evaluated on the CPU
    assert accuracy(model, data.test) == pytest.approx(report["final"]["accuracy"], abs=2 / len(data.test))
    resumed = _cli("run", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0 and "finished run" in resumed.stderr
