"""CI runs every test but the CUDA ones: tests/conftest.py turns any other skip into a failure there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs pytest in a fresh interpreter

SKIPPING_TESTS = '''
import pytest

def test_wants_a_missing_package():
    pytest.importorskip("a_package_that_is_not_installed")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_wants_a_gpu():
    pass
'''


def run_pytest(folder: Path, *, ci: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    return done.stdout.splitlines()[-1]


def test_in_ci_only_cuda_tests_may_skip(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    summary = run_pytest(tmp_path, ci="true")
    assert "1 failed" in summary and "1 skipped" in summary, summary


def test_outside_ci_a_missing_package_is_a_skip(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    summary = run_pytest(tmp_path, ci=None)
    assert "2 skipped" in summary and "failed" not in summary, summary
