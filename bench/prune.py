"""90% global magnitude pruning of a 25M-parameter conv + linear model: secateurs against
``torch.nn.utils.prune.global_unstructured(L1Unstructured)``.

Each side runs in its own fresh process (``--side ours`` / ``--side torch``), several times;
the parent prints medians and the ratios the issue asks for:

- time (Pruner construction + step, against the global_unstructured call) <= 0.1x torch's;
- peak resident-memory growth during the call <= 1.5x the weights' bytes;
- mask memory <= 0.25x the weights' bytes.

Peak growth is VmHWM after the call minus VmRSS before it, with VmHWM reset just before the
call (``/proc/self/clear_refs``); where that reset is not allowed, a sampling thread measures it.

    PYTHONPATH=src python bench/prune.py            # 3 runs per side, 1 thread
    PYTHONPATH=src python bench/prune.py --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

SPARSITY = 0.9


def build_model() -> nn.Module:
    """About 25M parameters: five 3x3 convolutions and three Linear layers (VGG-like)."""
    torch.manual_seed(0)
    convs = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    layers: list[nn.Module] = []
    for cin, cout in convs:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(2048, 4096), nn.ReLU(),
        nn.Linear(4096, 2048), nn.ReLU(),
        nn.Linear(2048, 1000),
    )


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory during a block, relative to the resident memory before it."""

    def __enter__(self) -> PeakRSS:
        self.before = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kernel = _status("VmHWM") <= self.before + (1 << 20)
        except OSError:
            self.kernel = False
        self.sampled = self.before
        self._stop = threading.Event()
        if not self.kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status("VmRSS"))
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if not self.kernel:
            self._thread.join()
        self.peak = _status("VmHWM") if self.kernel else max(self.sampled, _status("VmRSS"))
        self.growth = self.peak - self.before


def run_side(side: str) -> dict[str, float]:
    model = build_model()
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    params = sum(p.numel() for p in model.parameters())
    if side == "ours":
        from secateurs import prune

        with PeakRSS() as rss:
            start = time.perf_counter()
            pruner = prune.Pruner(model, sparsity=SPARSITY, criterion="magnitude", scope="global")
            pruner.step()
            seconds = time.perf_counter() - start
        mask_bytes = sum(m.numel() * m.element_size() for m in pruner.masks.values())
        zeros = sum(int((w == 0).sum()) for w in weights)
    else:
        import torch.nn.utils.prune as torch_prune

        modules = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        with PeakRSS() as rss:
            start = time.perf_counter()
            torch_prune.global_unstructured(
                [(m, "weight") for m in modules], pruning_method=torch_prune.L1Unstructured, amount=SPARSITY
            )
            seconds = time.perf_counter() - start
        mask_bytes = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m in modules)
        zeros = sum(int((m.weight == 0).sum()) for m in modules)
    return {
        "side": side,
        "seconds": seconds,
        "rss_growth": rss.growth,
        "rss_method": "VmHWM" if rss.kernel else "sampled",
        "mask_bytes": mask_bytes,
        "weight_bytes": weight_bytes,
        "params": params,
        "sparsity": zeros / sum(w.numel() for w in weights),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "torch"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side)))
        return
    results: dict[str, list[dict[str, float]]] = {"ours": [], "torch": []}
    for _ in range(args.runs):
        for side in ("ours", "torch"):
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            )
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    weight_bytes = results["ours"][0]["weight_bytes"]
    params = results["ours"][0]["params"]
    print(f"model: {params / 1e6:.1f}M parameters, {weight_bytes / 2**20:.1f} MiB of prunable fp32 weights; "
          f"{args.runs} runs per side, {args.threads} threads, median")
    print(f"{'':24}{'secateurs':>14}{'torch prune':>14}{'ratio':>10}{'target':>10}")
    ours_t, torch_t = median("ours", "seconds"), median("torch", "seconds")
    print(f"{'time (s)':24}{ours_t:>14.3f}{torch_t:>14.3f}{ours_t / torch_t:>10.3f}{'<= 0.1':>10}")
    for key, label, target in (("rss_growth", "peak RSS growth", 1.5), ("mask_bytes", "mask memory", 0.25)):
        ours, theirs = median("ours", key), median("torch", key)
        print(f"{label + ' (x weights)':24}{ours / weight_bytes:>14.3f}{theirs / weight_bytes:>14.3f}"
              f"{ours / max(theirs, 1):>10.3f}{'<= ' + str(target):>10}")
    print(f"{'sparsity reached':24}{median('ours', 'sparsity'):>14.4f}{median('torch', 'sparsity'):>14.4f}")
    print(f"memory measured by: {results['ours'][0]['rss_method']}")
    ok = (
        ours_t <= 0.1 * torch_t
        and median("ours", "rss_growth") <= 1.5 * weight_bytes
        and median("ours", "mask_bytes") <= 0.25 * weight_bytes
    )
    print("targets met" if ok else "TARGET MISSED")


if __name__ == "__main__":
    main()
