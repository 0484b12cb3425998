"""Benchmark: what a fresh process pays to start, against ``import torch`` alone.

Each command runs in a new interpreter ``--runs`` times (5 by default), the commands taking
turns in a rotating order so a change of machine load spreads over all of them; one unrecorded
warm-up round first fills the file cache and the bytecode caches. Reported: the median wall
time of each command with its min..max, the 1-minute load average before and after, and the
ratio of ``import secateurs.clip`` to ``import torch`` against the goal (clip costs what it
uses: no torch.distributed.tensor, torch_pruning, matplotlib or sklearn), and ``secateurs --help``
and a bad config key against their goals in seconds (neither may import torch).

    .venv/bin/python bench/startup.py [--runs 5]

The package must be importable by the interpreter running this script (an editable install
does it; PYTHONPATH is passed through unchanged).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL = 1.15
"""Most that ``import secateurs.clip`` may cost, as a multiple of ``import torch``."""

SECONDS_GOALS = {"secateurs --help": 0.6, "secateurs run --set nosuch.key=1": 1.5}
"""Most seconds (median) that these may take on an idle machine (#17): neither imports torch."""


def secateurs_command() -> list[str]:
    """The ``secateurs`` console script next to this interpreter, else ``python -m secateurs``."""
    script = Path(sys.executable).with_name("secateurs")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("secateurs")
    return [found] if found else [sys.executable, "-m", "secateurs"]


def commands() -> dict[str, tuple[list[str], int]]:
    """Label -> (argv, the exit code it must end with)."""
    py, cli = sys.executable, secateurs_command()
    return {
        "import torch": ([py, "-c", "import torch"], 0),
        "import secateurs.clip": ([py, "-c", "import secateurs.clip"], 0),
        "import secateurs.prune": ([py, "-c", "import secateurs.prune"], 0),
        "secateurs --help": ([*cli, "--help"], 0),
        "secateurs run --set nosuch.key=1": ([*cli, "run", "--set", "nosuch.key=1"], 2),
    }


def run_once(argv: list[str], expected: int) -> float:
    """Wall seconds of one fresh process; raises if it ends with another exit code."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(
            f"{' '.join(argv)}: exit code {done.returncode}, expected {expected}\n{done.stderr[-2000:]}"
        )
    return elapsed


def main() -> None:
    """Time every command in fresh processes and print the medians and the clip/torch ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command")
    args = parser.parse_args()
    cmds = commands()
    labels = list(cmds)
    load_before = os.getloadavg()[0]
    for label in labels:  # warm-up, not recorded
        run_once(*cmds[label])
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.runs):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            times[label].append(run_once(*cmds[label]))
    load_after = os.getloadavg()[0]

    print(f"python {sys.version.split()[0]} at {sys.executable}; {os.cpu_count()} CPUs")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print(f"{'command':36s} {'median':>8s}   min..max ({args.runs} fresh processes)")
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    for label, ts in times.items():
        print(f"{label:36s} {medians[label]:7.3f}s   {min(ts):.3f}..{max(ts):.3f}s")
    ratio = medians["import secateurs.clip"] / medians["import torch"]
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"import secateurs.clip / import torch: {ratio:.2f}x (goal <= {GOAL:.2f}x): {verdict}")
    for label, goal in SECONDS_GOALS.items():
        verdict = "PASS" if medians[label] <= goal else "FAIL"
        print(f"{label}: {medians[label]:.3f}s (goal <= {goal:.1f}s on an idle machine): {verdict}")


if __name__ == "__main__":
    main()
