"""Shared fixtures. Each test process uses one torch thread: pytest-xdist runs two at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton reads it when first imported, and with a CUDA build of torch other tests import it
    # (through torch.compile) before test_clip_fused.py can set it: without a GPU, Triton
    # kernels run only through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
"""CI installs every optional dependency (torchvision, timm, transformers, the three Keras
backends, the MiniLM wheel...), so there a skip can only mean a missing accelerator."""


def ci_allows_skip(reason: str) -> bool:
    """Whether CI may skip a test for ``reason``: only for want of a CUDA device."""
    return "cuda" in reason.lower()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first (each module kept together, so its module-scoped fixtures
    are made once): under ``-n 2`` the long runs start early instead of ending last on one worker."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}  # type: ignore[attr-defined]
    items.sort(key=lambda item: getattr(item, "module", None) not in slow_modules)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``keras_cases/`` is entered only when named: test_keras.py runs its cases in one process
    per backend, and its conftest imports keras for that process's backend (in this process it
    would load TensorFlow before Triton, which then crashes on import)."""
    if collection_path.name == "keras_cases" and not any("keras_cases" in str(a) for a in config.args):
        return True
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI, a skip for any reason but CUDA fails the test (a dependency CI should have)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not ci_allows_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where only CUDA tests may skip: {reason}"

def cli_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``secateurs ARGS`` run in this process by typer's CliRunner, as a CompletedProcess.

    For the commands that are refused before anything runs: the same code as the console
    script's, without the seconds a fresh interpreter spends importing torch. (The console
    script itself, its signal handling and its import path, are tested in subprocesses.)
    """
    from typer.testing import CliRunner

    from secateurs.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash, where the console script would print a traceback
    return subprocess.CompletedProcess(["secateurs", *args], result.exit_code, result.stdout, result.stderr)


# A reduced default job: same pipeline, a few epochs, used by end-to-end tests.
QUICK_RUN = [
    "train.epochs=3",
    "prune.epochs=3",
    "prune.finetune_epochs=2",
    "data.limit=600",
]


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit (header order may differ)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


TIMING_KEYS = ("latency_ms", "wall_seconds")
"""Report fields that differ between identical runs."""


def without_timing(obj: object) -> object:
    """``obj`` (a report) with every timing field left out, at any depth."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def interrupt_once_written(proc: subprocess.Popen[str], path: Path, *, timeout: float = 300) -> tuple[int, str]:
    """Send Ctrl-C (SIGINT) to ``proc`` as soon as ``path`` exists; its exit code and stderr."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr
