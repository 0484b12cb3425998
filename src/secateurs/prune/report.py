"""How sparse a model is, layer by layer: :func:`sparsity_report`.

Sparsity is read from the weights themselves (elements exactly equal to zero), so the report
is right whatever pruned the model. FLOPs come from
``torch_pruning.utils.count_ops_and_params`` on example inputs (multiply-accumulates of the dense
layer); ``sparse_flops`` scales each weight's share by its density, which is what a sparse kernel
would execute.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from secateurs.measure import count_macs_by_module
from secateurs.prune.masks import Target, find_targets

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    """One targeted weight."""

    name: str
    module: str
    kind: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    sparsity: float
    flops: int | None = None
    sparse_flops: int | None = None


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer rows plus totals: ``params``/``zeros``/``sparsity`` over the targeted weights,
    ``model_params``/``model_zeros`` over every parameter, ``flops``/``sparse_flops`` for the
    whole model (every layer torch_pruning counts, not only the targeted ones)."""

    layers: list[LayerSparsity]
    params: int
    zeros: int
    sparsity: float
    model_params: int
    model_zeros: int
    flops: int | None = None
    sparse_flops: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        for row in out["layers"]:
            row["shape"] = list(row["shape"])
        return out

    def _table(self) -> tuple[list[str], list[list[str]], list[str]]:
        """(header, one row of cells per weight, the total row): what both renderings show."""
        with_flops = self.flops is not None
        head = ["layer", "shape", "params", "zeros", "sparsity"] + (["FLOPs", "sparse FLOPs"] if with_flops else [])

        def cells(name: str, shape: str, params: int, zeros: int, sparsity: float, flops: int | None, sparse: int | None) -> list[str]:
            out = [name, shape, f"{params:,}", f"{zeros:,}", f"{sparsity:.2%}"]
            return out + ([_count(flops), _count(sparse)] if with_flops else [])

        rows = [cells(r.name, "x".join(map(str, r.shape)), r.params, r.zeros, r.sparsity, r.flops, r.sparse_flops)
                for r in self.layers]
        total = cells("total", "", self.params, self.zeros, self.sparsity, self.flops, self.sparse_flops)
        return head, rows, total

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table, one row per weight and a total row."""
        head, rows, total = self._table()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        lines.append("| " + " | ".join([f"**{total[0]}**", *total[1:]]) + " |")
        return "\n".join(lines)

    def to_rich(self) -> Any:
        """The same table as a ``rich.table.Table``."""
        from rich.table import Table

        head, rows, total = self._table()
        table = Table(title="sparsity by layer")
        for column in head:
            table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
        for cells in rows:
            table.add_row(*cells)
        table.add_row(*total, style="bold")
        return table

    def __str__(self) -> str:
        return self.to_markdown()


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _layer_flops(model: nn.Module, example_inputs: Any, targets: list[Target]) -> tuple[int, dict[str, int]]:
    """Dense FLOPs (multiply-accumulates, as Torch-Pruning and fvcore count them) of one example,
    in total and attributed to each target: its module's count, shared by the module's targeted
    weights in proportion to their size (e.g. an LSTM's ih/hh weights, an attention block's
    in_proj and out_proj, whose count torch_pruning reports on the attention module)."""
    total_flops, per_module = count_macs_by_module(model, example_inputs)
    modules = dict(model.named_modules())

    def owner(target: Target) -> str | None:
        parts = target.module_name.split(".") if target.module_name else []
        while True:
            name = ".".join(parts)
            module = modules.get(name)
            if module is not None and per_module.get(module):
                return name
            if not parts:
                return None
            parts.pop()

    groups: dict[str, list[Target]] = {}
    for target in targets:
        key = owner(target)
        if key is not None:
            groups.setdefault(key, []).append(target)
    out: dict[str, int] = {}
    for key, members in groups.items():
        total = per_module[modules[key]]
        weight = sum(t.numel for t in members)
        for t in members:
            out[t.name] = round(total * t.numel / weight)
    return total_flops, out


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    targets: Iterable[str | type[nn.Module]] | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
) -> SparsityReport:
    """Params, zeros, sparsity (and FLOPs given ``example_inputs``) per prunable weight.

    ``targets``/``exclude`` choose the rows as for :class:`~secateurs.prune.Pruner`.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[:2] = 0
    >>> report = sparsity_report(model, torch.zeros(1, 4))
    >>> [(row.name, row.zeros, row.flops, row.sparse_flops) for row in report.layers]
    [('0.weight', 8, 20, 10), ('2.weight', 0, 10, 10)]
    """
    chosen = find_targets(model, targets, exclude)
    total_flops, flops = _layer_flops(model, example_inputs, chosen) if example_inputs is not None else (None, {})
    layers = []
    for target in chosen:
        weight = target.param.detach()
        zeros = int((weight == 0).sum())
        params = weight.numel()
        sparsity = zeros / params if params else 0.0
        dense = flops.get(target.name)
        layers.append(
            LayerSparsity(
                name=target.name,
                module=target.module_name,
                kind=type(target.module).__name__,
                shape=tuple(weight.shape),
                params=params,
                zeros=zeros,
                sparsity=sparsity,
                flops=dense,
                sparse_flops=None if dense is None else round(dense * (1.0 - sparsity)),
            )
        )
    params = sum(row.params for row in layers)
    zeros = sum(row.zeros for row in layers)
    all_params = list({id(p): p for p in model.parameters()}.values())
    saved = sum(row.flops - row.sparse_flops for row in layers if row.flops is not None and row.sparse_flops is not None)
    return SparsityReport(
        layers=layers,
        params=params,
        zeros=zeros,
        sparsity=zeros / params if params else 0.0,
        model_params=sum(p.numel() for p in all_params),
        model_zeros=sum(int((p.detach() == 0).sum()) for p in all_params),
        flops=total_flops,
        sparse_flops=None if total_flops is None else total_flops - saved,
    )
