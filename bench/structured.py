"""Structured pruning against Torch-Pruning's own MagnitudePruner, in the same process.

1. Speed: a VGG-style CNN with BatchNorm at ratio 0.5 (every layer loses half its channels),
   CPU, 2 threads, batch 32 of 32x32 inputs. MACs reduction and latency speedup (median of
   >= 30 runs, the models timed in turn) for ``secateurs.prune.structured`` and for
   ``tp.pruner.MagnitudePruner``. Target: ours >= 0.95x Torch-Pruning's speedup.
2. Accuracy: the seed CNN and an MLP trained on scikit-learn's digits, pruned to the same MACs
   by Torch-Pruning's MagnitudePruner and by each of our criteria (layer and global scope),
   then fine-tuned identically. Our best configuration is chosen on the validation split;
   target: its test accuracy >= Torch-Pruning's.

    PYTHONPATH=src .venv/bin/python bench/structured.py            # 4-8 minutes on 2 busy cores
    PYTHONPATH=src .venv/bin/python bench/structured.py --quick    # fewer seeds and epochs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from secateurs.experiment.models import build_model
from secateurs.measure import count_macs, count_params, measure_latency
from secateurs.prune.surgery import structured

warnings.filterwarnings("ignore", module="torch_pruning")


def classifier_of(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def tp_magnitude(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """Torch-Pruning's documented recipe: MagnitudePruner, L2 group importance, classifier ignored."""
    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[classifier_of(model)],
    )
    pruner.step()
    return model


# --------------------------------------------------------------------------------------------
# 1. Speed
# --------------------------------------------------------------------------------------------

def speed(model_name: str, ratio: float, threads: int, batch: int, runs: int, repeats: int) -> None:
    torch.manual_seed(0)
    dense = build_model(model_name, input_shape=(3, 32, 32), num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    t0 = time.perf_counter()
    ours = structured(dense, x[:1], sparsity=ratio, scope="layer", criterion="magnitude").eval()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = tp_magnitude(dense, x[:1], ratio).eval()
    t_tp = time.perf_counter() - t0
    models = {"dense": dense, "secateurs": ours, "torch-pruning": theirs}
    for m in models.values():
        measure_latency(m, x, runs=1, warmup=5, threads=threads)
    # One timed pass of each model in turn, so load from other processes hits all of them alike.
    # The order rotates so that no model always runs right after the same one.
    latency: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i in range(runs * repeats):
        for name in names[i % 3:] + names[:i % 3]:
            latency[name].append(measure_latency(models[name], x, runs=1, warmup=0, threads=threads))
    med = {k: statistics.median(v) for k, v in latency.items()}
    iqr = {k: np.subtract(*np.percentile(v, [75, 25])) for k, v in latency.items()}
    macs = {k: count_macs(m, x[:1]) for k, m in models.items()}
    print(f"## Speed: {model_name} (BatchNorm), ratio {ratio}, CPU {threads} threads, batch {batch} on 32x32, "
          f"median of {runs * repeats} interleaved runs per model\n")
    print("| model | MACs/image | params | MACs reduction | latency ms (IQR) | speedup | prune time s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        prune_s = {"secateurs": f"{t_ours:.2f}", "torch-pruning": f"{t_tp:.2f}"}.get(name, "")
        print(f"| {name} | {macs[name] / 1e6:.1f}M | {count_params(m) / 1e6:.2f}M | "
              f"{macs['dense'] / macs[name]:.2f}x | {med[name]:.1f} ({iqr[name]:.1f}) | {med['dense'] / med[name]:.2f}x | {prune_s} |")
    same = all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True))
    rel = (med["dense"] / med["secateurs"]) / (med["dense"] / med["torch-pruning"])
    paired = statistics.median(t / o for t, o in zip(latency["torch-pruning"], latency["secateurs"], strict=True))
    print(f"\nsecateurs speedup / Torch-Pruning speedup = {rel:.3f} (target >= 0.95: "
          f"{'PASS' if rel >= 0.95 else 'FAIL'}); median of the per-cycle ratios, which cancels "
          f"load shared by a cycle: {paired:.3f}; identical pruned weights: {same}\n")


# --------------------------------------------------------------------------------------------
# 2. Accuracy at equal MACs on digits
# --------------------------------------------------------------------------------------------

@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits() -> Digits:
    """Stratified 60/20/20 split, standardised with the training statistics, images (1, 8, 8)."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

    def lab(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.long)

    return Digits(t(x_tr), lab(y_tr), t(x_va), lab(y_va), t(x_te), lab(y_te))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def train(model: nn.Module, data: Digits, epochs: int, seed: int, lr: float = 1e-3) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, 64, seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.eval()(x).argmax(1) == y).float().mean().item() * 100


def accuracy_at_equal_macs(model_name: str, tp_ratio: float, seeds: list[int], epochs: int, finetune: int,
                           configs: list[tuple[str, str]]) -> None:
    data = digits()
    example = data.x_train[:1]
    results: dict[str, list[tuple[float, float, float]]] = {}  # name -> (val, test, macs fraction)

    def record(name: str, model: nn.Module, dense_macs: int, seed: int) -> None:
        model = train(model, data, finetune, seed=seed + 100)
        results.setdefault(name, []).append(
            (accuracy(model, data.x_val, data.y_val), accuracy(model, data.x_test, data.y_test),
             count_macs(model, example) / dense_macs))

    for seed in seeds:
        torch.manual_seed(seed)
        dense = train(build_model(model_name, input_shape=(1, 8, 8), num_classes=10), data, epochs, seed)
        dense_macs = count_macs(dense, example)
        results.setdefault("dense", []).append(
            (accuracy(dense, data.x_val, data.y_val), accuracy(dense, data.x_test, data.y_test), 1.0))
        theirs = tp_magnitude(dense, example, tp_ratio)
        goal = count_macs(theirs, example) / dense_macs
        record("torch-pruning magnitude", theirs, dense_macs, seed)
        scoring = list(batches(data.x_train, data.y_train, 128, seed))[:4]
        for criterion, scope in configs:
            ours = structured(dense, example, target_macs=goal, criterion=criterion, scope=scope,
                              batches=scoring)
            record(f"secateurs {criterion} ({scope})", ours, dense_macs, seed)

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0:.2f}"

    print(f"## Accuracy at equal MACs: {model_name} on digits, Torch-Pruning ratio {tp_ratio}, "
          f"{len(seeds)} seeds, {epochs} epochs dense + {finetune} epochs fine-tuning (Adam 1e-3)\n")
    print("| method | MACs kept | val acc % | test acc % |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.mean(r[2] for r in rows):.3f} | {ms([r[0] for r in rows])} | {ms([r[1] for r in rows])} |")
    ours = {k: v for k, v in results.items() if k.startswith("secateurs")}
    best = max(ours, key=lambda k: statistics.mean(r[0] for r in ours[k]))
    best_test = statistics.mean(r[1] for r in ours[best])
    tp_test = statistics.mean(r[1] for r in results["torch-pruning magnitude"])
    print(f"\nbest by validation: {best}: test {best_test:.2f}% vs Torch-Pruning {tp_test:.2f}% "
          f"({'PASS' if best_test >= tp_test else 'FAIL'}: equal or better)\n")


CONFIGS = [
    ("magnitude", "global"), ("magnitude", "layer"), ("taylor", "global"),
    ("activation", "global"), ("gradient", "global"), ("random", "global"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg11-bn", help="VGG-style zoo model for the speed part")
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs, fewer configs")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not args.skip_speed:
        speed(args.model, ratio=0.5, threads=2, batch=32, runs=30, repeats=1 if args.quick else 3)
    if not args.skip_accuracy:
        seeds = [0] if args.quick else [0, 1, 2]
        epochs, finetune = (10, 5) if args.quick else (20, 8)
        configs = CONFIGS[:4] if args.quick else CONFIGS
        for name, ratio in (("seed-cnn", 0.8), ("mlp", 0.8)):
            accuracy_at_equal_macs(name, ratio, seeds, epochs, finetune, configs)


if __name__ == "__main__":
    main()
