"""Accuracy after pruning on scikit-learn's digits: criteria and scopes side by side, and
against ``torch.nn.utils.prune`` with identical fine-tuning.

Protocol, per seed (3 seeds; mean +- std over seeds): a stratified 70/30 train/test split drawn
by the seed; an MLP 64-300-100-10 (the LeNet-300-100 shape) trained dense with Adam; then, for
every method and sparsity, a copy of the dense model is pruned one-shot (data criteria scored on
the training set) and fine-tuned with a fresh Adam for the same number of epochs, batches in the
same order for every method. The issue's targets are checked at the end:

- 90% global magnitude loses <= 0.5 accuracy points against the dense model;
- at 95% and 98%: global magnitude >= layer-wise magnitude >= random;
- global magnitude >= ``torch.nn.utils.prune.global_unstructured(L1Unstructured)``.

    PYTHONPATH=src python bench/quality.py                 # about two minutes on one core
    PYTHONPATH=src python bench/quality.py --seeds 0 1 2 3 4 --finetune-epochs 40
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.utils.prune as torch_prune
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from secateurs import prune
from secateurs.experiment.models import build_model

SPARSITIES = (0.9, 0.95, 0.98)
METHODS = {
    "magnitude (global)": dict(criterion="magnitude", scope="global"),
    "magnitude (layer)": dict(criterion="magnitude", scope="layer"),
    "random": dict(criterion="random", scope="global"),
    "gradient (seeds)": dict(criterion="gradient", scope="global"),
    "activation (seeds)": dict(criterion="activation", scope="global"),
    "taylor": dict(criterion="taylor", scope="global"),
    "synflow": dict(criterion="synflow", scope="global"),
    "torch.nn.utils.prune L1 (global)": None,
}

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load(seed: int) -> Data:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.3, stratify=digits.target, random_state=seed)
    return x[train], y[train], x[test], y[test]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def train(model: nn.Module, data: Data, epochs: int, seed: int, hook: Callable[[torch.optim.Optimizer], None] | None = None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if hook is not None:
        hook(optimizer)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(data[0], data[1], 32, seed * 1000 + epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    return float((model(data[2]).argmax(1) == data[3]).float().mean()) * 100


def prune_and_finetune(dense: nn.Module, data: Data, method: dict | None, sparsity: float, epochs: int, seed: int) -> float:
    model = copy.deepcopy(dense)
    if method is None:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        torch_prune.global_unstructured(
            [(m, "weight") for m in layers], pruning_method=torch_prune.L1Unstructured, amount=sparsity
        )
        train(model, data, epochs, seed)
        for m in layers:
            torch_prune.remove(m, "weight")
        return accuracy(model, data)
    criterion = method["criterion"]
    if criterion == "random":
        criterion = prune.make_criterion("random", seed=seed)
    pruner = prune.Pruner(model, sparsity=sparsity, criterion=criterion, scope=method["scope"])
    if pruner.requires_data or method["criterion"] == "synflow":
        pruner.score(batches(data[0], data[1], 128, seed), nn.functional.cross_entropy)
    pruner.step()
    train(model, data, epochs, seed, hook=pruner.attach)
    pruner.finalize()
    reached = prune.sparsity_report(model).sparsity
    assert abs(reached - sparsity) < 1e-3, (reached, sparsity)
    return accuracy(model, data)


def fmt(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {std:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    dense_acc: list[float] = []
    results: dict[str, dict[float, list[float]]] = {m: {s: [] for s in SPARSITIES} for m in METHODS}
    for seed in args.seeds:
        data = load(seed)
        torch.manual_seed(seed)
        dense = build_model("mlp", input_shape=(64,), num_classes=10, hidden=(300, 100))
        train(dense, data, args.dense_epochs, seed)
        dense_acc.append(accuracy(dense, data))
        for name, method in METHODS.items():
            for sparsity in SPARSITIES:
                torch.manual_seed(seed)
                results[name][sparsity].append(
                    prune_and_finetune(dense, data, method, sparsity, args.finetune_epochs, seed)
                )

    print(f"digits, MLP 64-300-100-10, seeds {args.seeds}, dense {args.dense_epochs} epochs, "
          f"one-shot prune + {args.finetune_epochs} epochs fine-tuning (Adam 1e-3); test accuracy %, mean ± std")
    header = f"| {'method':34} | " + " | ".join(f"{f'{s:.0%} sparse':>14}" for s in SPARSITIES) + " |"
    print(header)
    print("|" + "-" * 36 + "|" + "|".join(["-" * 16] * len(SPARSITIES)) + "|")
    print(f"| {'dense':34} | " + " | ".join(f"{fmt(dense_acc):>14}" for _ in SPARSITIES) + " |")
    for name in METHODS:
        print(f"| {name:34} | " + " | ".join(f"{fmt(results[name][s]):>14}" for s in SPARSITIES) + " |")

    def mean(name: str, s: float) -> float:
        return statistics.mean(results[name][s])

    drop = statistics.mean(d - p for d, p in zip(dense_acc, results["magnitude (global)"][0.9], strict=True))
    checks = [(f"90% global magnitude loses {drop:.2f} points (<= 0.5)", drop <= 0.5)]
    for s in (0.95, 0.98):
        g, layer, r = mean("magnitude (global)", s), mean("magnitude (layer)", s), mean("random", s)
        checks.append((f"{s:.0%}: global {g:.2f} >= layer {layer:.2f} >= random {r:.2f}", g >= layer >= r))
    for s in SPARSITIES:
        ours, theirs = mean("magnitude (global)", s), mean("torch.nn.utils.prune L1 (global)", s)
        checks.append((f"{s:.0%}: secateurs global magnitude {ours:.2f} >= torch.nn.utils.prune {theirs:.2f}", ours >= theirs))
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
