"""90% global magnitude pruning of a 25M-parameter conv + linear model: secateurs against
``torch.nn.utils.prune.global_unstructured(L1Unstructured)``.

Each side runs in its own fresh process (``--side ours`` / ``--side torch``), several times;
the parent prints medians and the ratios the issue asks for:

- time (Pruner construction + step, against the global_unstructured call) <= 0.1x torch's;
- peak resident-memory growth during the call <= 1.5x the weights' bytes;
- mask memory <= 0.25x the weights' bytes.

Peak growth is VmHWM after the call minus VmRSS before it, with VmHWM reset just before the
call (``/proc/self/clear_refs``); where that reset is not allowed, a sampling thread measures it.

``--busy N`` measures twice: on the machine as it is, then while N CPU-bound processes (started
and stopped here, by their own process ids) keep its cores busy, as data-loader workers do in a
training job. It adds the targets secateurs <= 0.1x torch busy too, and secateurs busy <= 3x
secateurs idle. Each side uses torch's default number of intra-op threads unless ``--threads``.

    PYTHONPATH=src python bench/prune.py            # 3 runs per side
    PYTHONPATH=src python bench/prune.py --runs 5 --busy 2
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


BUSY_LOOP = "while True: pass"


def measure(runs: int, threads: int) -> dict[str, list[dict[str, float]]]:
    """``runs`` fresh processes per side, alternating sides."""
    results: dict[str, list[dict[str, float]]] = {"ours": [], "torch": []}
    for _ in range(runs):
        for side in ("ours", "torch"):
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, "--threads", str(threads)],
                check=True, capture_output=True, text=True,
            )
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure_busy(runs: int, threads: int, busy: int) -> dict[str, list[dict[str, float]]]:
    """:func:`measure` while ``busy`` CPU-bound processes run; they are stopped by their ids."""
    loaders = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(1.0)  # let them reach full speed
        return measure(runs, threads)
    finally:
        for proc in loaders:
            proc.kill()
        for proc in loaders:
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "torch"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--busy", type=int, default=0, help="also measure with this many CPU-bound processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side)))
        return
    print(f"load average before: {load_average()}")
    results = measure(args.runs, args.threads)
    busy = measure_busy(args.runs, args.threads, args.busy) if args.busy else None
    print(f"load average after: {load_average()}")
    ok = report(results, args.runs, torch.get_num_threads() if not args.threads else args.threads, "as it is")
    if busy is not None:
        ok = report(busy, args.runs, args.threads or torch.get_num_threads(), f"{args.busy} busy processes") and ok
        idle_t = statistics.median(r["seconds"] for r in results["ours"])
        busy_t = statistics.median(r["seconds"] for r in busy["ours"])
        print(f"secateurs busy / as it is: {busy_t:.3f} s / {idle_t:.3f} s = {busy_t / idle_t:.2f}x (target <= 3)")
        ok = ok and busy_t <= 3 * idle_t
    print("targets met" if ok else "TARGET MISSED")


def report(results: dict[str, list[dict[str, float]]], runs: int, threads: int, machine: str) -> bool:
    """Print the medians of one measurement; whether its targets are met."""

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    weight_bytes = results["ours"][0]["weight_bytes"]
    params = results["ours"][0]["params"]
    print(f"\nmachine {machine}. model: {params / 1e6:.1f}M parameters, {weight_bytes / 2**20:.1f} MiB of "
          f"prunable fp32 weights; {runs} fresh processes per side, {threads} threads, median")
    print(f"{'':24}{'secateurs':>14}{'torch prune':>14}{'ratio':>10}{'target':>10}")
    ours_t, torch_t = median("ours", "seconds"), median("torch", "seconds")
    print(f"{'time (s)':24}{ours_t:>14.3f}{torch_t:>14.3f}{ours_t / torch_t:>10.3f}{'<= 0.1':>10}")
    for key, label, target in (("rss_growth", "peak RSS growth", 1.5), ("mask_bytes", "mask memory", 0.25)):
        ours, theirs = median("ours", key), median("torch", key)
        print(f"{label + ' (x weights)':24}{ours / weight_bytes:>14.3f}{theirs / weight_bytes:>14.3f}"
              f"{ours / max(theirs, 1):>10.3f}{'<= ' + str(target):>10}")
    print(f"{'sparsity reached':24}{median('ours', 'sparsity'):>14.4f}{median('torch', 'sparsity'):>14.4f}")
    print(f"memory measured by: {results['ours'][0]['rss_method']}")
    return (
        ours_t <= 0.1 * torch_t
        and median("ours", "rss_growth") <= 1.5 * weight_bytes
        and median("ours", "mask_bytes") <= 0.25 * weight_bytes
    )


if __name__ == "__main__":
    main()
