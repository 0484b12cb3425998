"""The default job's wall time and results: `secateurs run` with no arguments, 3 times.

Prints each run's wall time (process start to exit, as a user sees it), the report's figures,
and the median. Issue #2's bar: median <= 90 s on 2 cores, dense >= 0.97, final >= 0.95 at
sparsity >= 0.89, checkpoint <= 0.25x dense.

    .venv/bin/python bench/run.py [--repeats 3] [-- extra secateurs run args]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="extra arguments for secateurs run")
    args = parser.parse_args()
    walls, reports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "secateurs", "run", "--quiet", "--out", str(out), *args.extra], check=True)
            walls.append(time.perf_counter() - t0)
            reports.append(json.loads((out / "report.json").read_text()))
            r = reports[-1]
            print(
                f"run {i}: wall {walls[-1]:.1f} s (report {r['wall_seconds']:.1f} s)  dense {r['dense']['accuracy']:.4f}  "
                f"final {r['final']['accuracy']:.4f} at sparsity {r['final']['sparsity']:.4f}  "
                f"checkpoint {r['final']['checkpoint_bytes'] / r['dense']['checkpoint_bytes']:.3f}x dense",
                flush=True,
            )
    print(f"median wall time: {statistics.median(walls):.1f} s over {len(walls)} runs (bar: <= 90 s)")


if __name__ == "__main__":
    main()
