"""``secateurs sensitivity``: how much each layer can lose, and per-layer sparsities chosen from it.

1. The dense model is trained once, as an ordinary run with ``prune.kind = 'none'`` (``OUT/dense``;
   resumed if interrupted, reused if finished).
2. Sensitivity curves: each prunable layer alone is pruned to each of ``sensitivity.sparsities``
   in one shot with the configured criterion, and the validation accuracy is measured
   (``sensitivity.csv``, ``sensitivity.png``).
3. Search: starting from no pruning, a greedy loop raises one layer at a time to the next rung of
   a ladder of sparsities, choosing each time the layer whose rise costs the least validation
   loss per pruned weight, measured on the whole model pruned in one shot. With
   ``goal = 'target'`` it stops exactly at ``sensitivity.target`` overall sparsity; with
   ``goal = 'highest'`` it keeps climbing while the validation accuracy stays within
   ``sensitivity.budget`` of dense. Each round costs one evaluation per layer, so the search costs
   O(layers^2 x rungs) evaluations: seconds on the digits CNN, long on a 50-layer network.
4. The result is compared, at the same overall sparsity, with uniform layer-wise sparsity
   (every layer at the same sparsity) and with one global ranking, on validation and test
   (``search.json``, ``sensitivity.md``), and written as ``per_layer.toml``: the full run config
   with ``prune.per_layer`` and ``prune.sparsity`` set, for ``secateurs run OUT/per_layer.toml``.

Every accuracy here is measured right after one-shot pruning, before any fine-tuning: it ranks
allocations, while ``secateurs run`` with the allocation prunes gradually and fine-tunes.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.experiment.config import RunConfig, to_toml, validate
from secateurs.experiment.data import Dataset, Split, batches
from secateurs.experiment.train import device_of, run_device, to_device
from secateurs.serialization import atomic_write_bytes, atomic_write_text

LADDER = (0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
"""Sparsities the search climbs through, layer by layer (the probe sparsities are added)."""


@dataclass(frozen=True)
class Layer:
    """One prunable weight as ``prune.per_layer`` names it, and its size."""

    key: str
    params: int


@dataclass(frozen=True)
class Evaluation:
    """A pruned model's validation (and optionally test) accuracy and loss, and its sparsity."""

    val_accuracy: float
    val_loss: float
    sparsity: float
    layers: dict[str, float]
    test_accuracy: float | None = None


@torch.no_grad()
def _evaluate_split(model: nn.Module, split: Split, batch_size: int = 512) -> tuple[float, float]:
    model.eval()
    device = device_of(model)
    correct, loss = 0, 0.0
    for batch in batches(split, batch_size):
        x, y = to_device(batch, device)
        out = model(x)
        correct += int((out.argmax(dim=1) == y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
    n = max(len(split), 1)
    return correct / n, loss / n


def layer_keys(targets: Sequence[prune.Target]) -> list[Layer]:
    """Each target under its module's name, or its parameter's name where a module holds several."""
    per_module: dict[str, int] = {}
    for t in targets:
        per_module[t.module_name] = per_module.get(t.module_name, 0) + 1
    return [Layer(t.module_name if t.module_name and per_module[t.module_name] == 1 else t.name, t.numel) for t in targets]


class Probe:
    """Prunes a copy of the dense weights in one shot and measures the result.

    Data criteria score the dense model once; every evaluation reuses those statistics, so all
    allocations are ranked by the same scores.
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, data: Dataset):
        self.cfg = cfg
        self.model = model
        self.data = data
        self.dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        template = self._pruner(sparsity=0.0, scope="global", per_layer=None)
        self.layers = layer_keys(template.targets)
        if template.requires_data:
            n = cfg.prune.score_batches
            template.score(islice(batches(data.train, cfg.data.batch_size, seed=cfg.seed), n), lambda out, y: F.cross_entropy(out, y))
        self.criterion_state = template.state_dict()
        self.total = sum(layer.params for layer in self.layers)
        self.dense = self._measure(None, test=True)

    def _pruner(self, *, sparsity: float, scope: str, per_layer: Mapping[str, float] | None) -> prune.Pruner:
        self.model.load_state_dict(self.dense_state)
        torch.manual_seed(self.cfg.seed)  # the random criterion draws its seed when bound
        return prune.Pruner(
            self.model, sparsity=sparsity, criterion=self.cfg.prune.criterion, scope=scope,
            exclude=tuple(self.cfg.prune.exclude), per_layer=per_layer,
        )

    def _measure(self, pruner: prune.Pruner | None, *, test: bool = False) -> Evaluation:
        val_acc, val_loss = _evaluate_split(self.model, self.data.val)
        test_acc = _evaluate_split(self.model, self.data.test)[0] if test else None
        layers = {layer.key: 0.0 for layer in self.layers}
        if pruner is not None:
            by_param = pruner.layer_sparsity()
            layers = {layer.key: by_param[t.name] for layer, t in zip(self.layers, pruner.targets, strict=True)}
        sparsity = sum(layers[layer.key] * layer.params for layer in self.layers) / self.total
        return Evaluation(val_acc, val_loss, sparsity, layers, test_acc)

    def evaluate(self, *, per_layer: Mapping[str, float] | None = None, sparsity: float = 0.0, scope: str = "global", test: bool = False) -> Evaluation:
        """Prune the dense weights (``per_layer`` sparsities, or ``sparsity`` over ``scope``) and measure."""
        pruner = self._pruner(sparsity=sparsity, scope=scope, per_layer=per_layer)
        pruner.load_state_dict(self.criterion_state)
        pruner.step()
        return self._measure(pruner, test=test)

    def curves(self, sparsities: Sequence[float]) -> list[dict[str, Any]]:
        """One row per (layer, sparsity): validation accuracy and loss with only that layer pruned."""
        rows = []
        for layer in self.layers:
            for s in sparsities:
                ev = self.evaluate(per_layer={layer.key: s})
                rows.append({"layer": layer.key, "params": layer.params, "sparsity": s, "val_accuracy": ev.val_accuracy, "val_loss": ev.val_loss})
        return rows


def search(probe: Probe, *, goal: str, target: float, budget: float, ladder: Sequence[float] = LADDER) -> tuple[dict[str, float], Evaluation, list[dict[str, Any]]]:
    """Greedy per-layer sparsities (see the module docstring); returns (allocation, its evaluation, trace).

    Each round tries raising every layer to its next rung (capped at what ``target`` still needs)
    and keeps the rise that adds the least validation loss per pruned weight; ``goal='highest'``
    only accepts rises that keep validation accuracy within ``budget`` of dense.
    """
    rungs = sorted(set(ladder))
    sizes = {layer.key: layer.params for layer in probe.layers}
    alloc = dict.fromkeys(sizes, 0.0)
    current = probe.dense
    trace: list[dict[str, Any]] = []
    while True:
        need = target * probe.total - sum(alloc[k] * n for k, n in sizes.items()) if goal == "target" else float("inf")
        if need < 0.5:  # within half a weight of the target
            break
        best: tuple[float, float, str, float, Evaluation] | None = None
        for key, n in sizes.items():
            higher = [r for r in rungs if r > alloc[key] + 1e-12]
            if not higher:
                continue
            rung = min(higher[0], alloc[key] + need / n)
            gained = (rung - alloc[key]) * n
            ev = probe.evaluate(per_layer={**alloc, key: rung})
            if goal == "highest" and probe.dense.val_accuracy - ev.val_accuracy > budget:
                continue
            cost = (ev.val_loss - current.val_loss) / gained
            if best is None or (cost, -gained) < (best[0], best[1]):
                best = (cost, -gained, key, rung, ev)
        if best is None:
            break
        _, _, key, rung, current = best
        alloc[key] = rung
        trace.append({"layer": key, "sparsity": rung, "overall": current.sparsity, "val_accuracy": current.val_accuracy, "val_loss": current.val_loss})
    final = probe.evaluate(per_layer=alloc, test=True)
    return alloc, final, trace


# --- the command -----------------------------------------------------------------------------


def dense_config(cfg: RunConfig) -> RunConfig:
    """The dense-only run the analysis starts from."""
    data = cfg.model_dump(mode="json")
    # only what shapes dense training: another search in the same folder reuses the dense run
    return validate({**data, "prune": {"kind": "none"}, "sweep": {}, "sensitivity": {}})


def per_layer_config(cfg: RunConfig, alloc: Mapping[str, float], sparsity: float) -> RunConfig:
    """``cfg`` with the searched ``prune.per_layer`` and the overall ``prune.sparsity`` it reaches."""
    data = cfg.model_dump(mode="json")
    data["prune"] = {**data["prune"], "kind": "unstructured", "sparsity": round(sparsity, 4), "per_layer": {k: round(v, 4) for k, v in alloc.items()}}
    return validate(data)


def set_option(alloc: Mapping[str, float], sparsity: float) -> str:
    """The same allocation as ``--set`` arguments for ``secateurs run``."""
    table = ", ".join(f"{json.dumps(k)} = {round(v, 4)}" for k, v in alloc.items())
    return f"--set 'prune.per_layer={{{table}}}' --set prune.sparsity={round(sparsity, 4)}"


def analyse(cfg: RunConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the whole analysis into ``out`` and return what ``search.json`` holds."""
    if cfg.prune.kind == "structured":
        raise SecateursError("prune.kind: got 'structured'; allowed: unstructured (sensitivity searches per-layer mask sparsities)")
    from secateurs.experiment.data import load_dataset
    from secateurs.experiment.models import build_model
    from secateurs.experiment.sweep import run_cell

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data)  # a bad dataset or model fails here, before anything is written
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes)
    model.to(run_device(cfg.train.device))  # the probes run where the dense run trains (train.device)
    if out.exists() and any(out.iterdir()) and not (out / "dense").is_dir():
        raise SecateursError(f"--out: {str(out)!r} is not empty; allowed: a new or empty folder, or an earlier sensitivity run's")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", to_toml(cfg))
    except OSError as exc:
        raise SecateursError(f"--out: cannot write to {str(out)!r} ({exc.strerror})") from None
    run_cell(dense_config(cfg), out / "dense", progress=progress)
    prune.load(out / "dense" / "model.safetensors", model)
    started = time.perf_counter()
    probe = Probe(cfg, model, data)
    s = cfg.sensitivity
    curve_rows = probe.curves(s.sparsities)
    alloc, found, trace = search(probe, goal=s.goal, target=s.target, budget=s.budget, ladder=sorted({*LADDER, *s.sparsities}))
    overall = found.sparsity
    uniform = probe.evaluate(sparsity=overall, scope="layer", test=True)
    global_ = probe.evaluate(sparsity=overall, scope="global", test=True)
    result = {
        "model": cfg.model.name,
        "dataset": data.name,
        "criterion": cfg.prune.criterion,
        "goal": s.goal,
        "target": s.target,
        "budget": s.budget,
        "layers": [asdict(layer) for layer in probe.layers],
        "dense": asdict(probe.dense),
        "search": asdict(found),
        "within_budget": probe.dense.val_accuracy - found.val_accuracy <= s.budget,
        "uniform": asdict(uniform),
        "global": asdict(global_),
        "per_layer": alloc,
        "trace": trace,
        "seconds": time.perf_counter() - started,
    }
    write_results(out, cfg, result, curve_rows)
    return result


def write_results(out: Path, cfg: RunConfig, result: Mapping[str, Any], curve_rows: Sequence[Mapping[str, Any]]) -> None:
    """Write sensitivity.csv, sensitivity.png, search.json, per_layer.toml and sensitivity.md."""
    from secateurs.experiment.sweep_plots import sensitivity_png

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["layer", "params", "sparsity", "val_accuracy", "val_loss"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve_rows)
    atomic_write_text(out / "sensitivity.csv", buf.getvalue())
    atomic_write_text(out / "search.json", json.dumps(result, indent=2) + "\n")
    tuned = per_layer_config(cfg, result["per_layer"], result["search"]["sparsity"])
    atomic_write_text(out / "per_layer.toml", to_toml(tuned))
    atomic_write_bytes(out / "sensitivity.png", sensitivity_png(curve_rows, result))
    atomic_write_text(out / "sensitivity.md", markdown(result, curve_rows, out))


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def markdown(result: Mapping[str, Any], curve_rows: Sequence[Mapping[str, Any]], out: Path) -> str:
    """sensitivity.md: the curves as a table, the searched allocation and the comparison."""
    layers = result["layers"]
    sparsities = sorted({r["sparsity"] for r in curve_rows})
    acc = {(r["layer"], r["sparsity"]): r["val_accuracy"] for r in curve_rows}
    d, found, uni, glo = result["dense"], result["search"], result["uniform"], result["global"]
    goal = (
        f"reach {100 * result['target']:g}% overall sparsity" if result["goal"] == "target"
        else f"the highest overall sparsity within {100 * result['budget']:g} points of dense validation accuracy"
    )
    lines = [
        f"# secateurs sensitivity: {result['model']} on {result['dataset']}, criterion {result['criterion']}",
        "",
        f"Dense model: validation accuracy {_pct(d['val_accuracy'])}, test accuracy {_pct(d['test_accuracy'])}. "
        "Every number below is measured right after one-shot pruning, before fine-tuning.",
        "",
        "## Sensitivity: validation accuracy with only that layer pruned",
        "",
        "| layer | params | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
        "| --- | ---: |" + " ---: |" * len(sparsities),
    ]
    for layer in layers:
        lines.append(f"| {layer['key']} | {layer['params']:,} | " + " | ".join(_pct(acc[(layer['key'], s)]) for s in sparsities) + " |")
    lines += [
        "",
        f"## Search: {goal}",
        "",
        "| layer | params | searched | uniform layer-wise | global ranking |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for layer in layers:
        k = layer["key"]
        lines.append(f"| {k} | {layer['params']:,} | {_pct(found['layers'][k])} | {_pct(uni['layers'][k])} | {_pct(glo['layers'][k])} |")
    lines += [
        "",
        "| allocation | overall sparsity | validation accuracy | test accuracy |",
        "| --- | ---: | ---: | ---: |",
        f"| dense | 0.0% | {_pct(d['val_accuracy'])} | {_pct(d['test_accuracy'])} |",
        f"| searched per-layer | {_pct(found['sparsity'])} | {_pct(found['val_accuracy'])} | {_pct(found['test_accuracy'])} |",
        f"| uniform layer-wise | {_pct(uni['sparsity'])} | {_pct(uni['val_accuracy'])} | {_pct(uni['test_accuracy'])} |",
        f"| global ranking | {_pct(glo['sparsity'])} | {_pct(glo['val_accuracy'])} | {_pct(glo['test_accuracy'])} |",
        "",
    ]
    if not result["within_budget"]:
        lines += [
            f"The searched allocation loses {100 * (d['val_accuracy'] - found['val_accuracy']):.1f} validation points before "
            f"fine-tuning, more than the budget of {100 * result['budget']:g}; fine-tuning in `secateurs run` recovers part of it.",
            "",
        ]
    lines += [
        "Train with it: `secateurs run " + str(out / "per_layer.toml") + "`, or add to any run:",
        "",
        f"    {set_option(result['per_layer'], found['sparsity'])}",
        "",
    ]
    return "\n".join(lines)
