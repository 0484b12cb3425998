"""secateurs.keras on every installed Keras backend, one process per backend.

Keras fixes its backend once per process, so the ``tests/keras_cases/cases_*.py`` files run in
one fresh pytest subprocess per backend with ``KERAS_BACKEND`` set; a failure shows that run's
report. The backends tested are those whose package is installed (CI installs all three).

Where the time goes (2 cores): importing Keras with its backend costs 5-25 s a process (the
load decides), so the case files share one process per backend; and XLA's CPU compiler (JAX's
``fit``, TensorFlow's ``jit_compile``) spent most of the JAX run optimising the machine code of
each tiny train step (a Conv2D step: 35 s, 6 s at LLVM level 0). The steps here run a few
hundred times at most, so the backend compiler runs at ``--xla_backend_optimization_level=0``:
the same HLO, the same float semantics (no fast math either way), less time optimising loops.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("keras") is None:  # not imported here: it would load a backend
    pytest.skip("keras is not installed", allow_module_level=True)

CASES = sorted((Path(__file__).parent / "keras_cases").glob("cases_*.py"))
BACKENDS = [
    name
    for name, module in (("torch", "torch"), ("jax", "jax"), ("tensorflow", "tensorflow"))
    if importlib.util.find_spec(module) is not None
]


def _launch(backend: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        # one intra-op thread each: the backends run side by side (torch: tests/conftest.py)
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
        "--xla_cpu_multi_thread_eigen=false",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *map(str, CASES)]
    root = Path(__file__).parent.parent
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)


def test_a_keras_backend_is_installed() -> None:
    assert BACKENDS, "no Keras backend installed"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_cases_on_the_backend(backend: str) -> None:
    """One test per backend, so that pytest's workers take them side by side (most of each run
    is single-threaded importing, tracing and compiling)."""
    proc = _launch(backend)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"KERAS_BACKEND={backend} (exit {proc.returncode}):\n{out[-8000:]}"


def test_core_never_imports_keras() -> None:
    code = "import sys, secateurs, secateurs.clip, secateurs.prune; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
