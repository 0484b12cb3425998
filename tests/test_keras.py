"""secateurs.keras on every installed Keras backend, one process per (backend, case file).

Keras fixes its backend once per process, so each ``tests/keras_cases/cases_*.py`` runs in a
fresh pytest subprocess with ``KERAS_BACKEND`` set; a failure shows that run's report. The
backends tested are those whose package is installed (CI installs all three).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

CASES = sorted((Path(__file__).parent / "keras_cases").glob("cases_*.py"))
BACKENDS = [
    name
    for name, module in (("torch", "torch"), ("jax", "jax"), ("tensorflow", "tensorflow"))
    if importlib.util.find_spec(module) is not None
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_keras_cases(backend: str, case: Path) -> None:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(case)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=case.parent.parent.parent)
    assert proc.returncode == 0, f"KERAS_BACKEND={backend} {case.name}:\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"


def test_core_never_imports_keras() -> None:
    code = "import sys, secateurs, secateurs.clip, secateurs.prune; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
