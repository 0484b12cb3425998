"""sparsity_report: per-layer params, zeros, sparsity and FLOPs, totals, JSON and tables."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateurs.experiment.models import build_model
from secateurs.prune import Pruner, sparsity_report


def test_rows_count_exact_zeros_per_weight():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[2].weight[:, :10] = 0
    report = sparsity_report(model)
    rows = {row.name: row for row in report.layers}
    assert rows["0.weight"].params == 36 and rows["0.weight"].zeros == 18
    assert rows["0.weight"].sparsity == 0.5 and rows["0.weight"].shape == (4, 1, 3, 3)
    assert rows["2.weight"].zeros == 30 and rows["2.weight"].kind == "Linear"
    assert report.params == 36 + 432 and report.zeros == 48
    assert report.sparsity == pytest.approx(48 / 468)
    assert report.model_params == 36 + 4 + 432 + 3
    assert report.flops is None and rows["0.weight"].flops is None


def test_flops_per_layer_scale_with_density():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:15] = 0
    report = sparsity_report(model, torch.zeros(1, 10))
    first, second = report.layers
    assert first.flops == 10 * 20 + 20  # torch_pruning: MACs plus bias adds
    assert first.sparse_flops == round(first.flops * 0.25)
    assert second.sparse_flops == second.flops == 20 * 5 + 5
    assert report.flops == first.flops + second.flops + 20  # ReLU counted too
    assert report.sparse_flops == report.flops - (first.flops - first.sparse_flops)


@pytest.mark.parametrize("batch", [1, 8])
def test_flops_are_per_example_whatever_the_batch(batch: int) -> None:
    # torch_pruning divides its total by the batch but not its per-module counts: unscaled,
    # a batch of 8 gave 8x the layer FLOPs of a total they must add up to (negative savings)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False))
    with torch.no_grad():
        model[0].weight[:, :8] = 0
    report = sparsity_report(model, torch.zeros(batch, 16))
    first, second = report.layers
    assert (first.flops, first.sparse_flops) == (16 * 32, 16 * 32 // 2)
    assert second.flops == second.sparse_flops == 32 * 4
    assert report.flops == 16 * 32 + 32 + 32 * 4  # the ReLU's 32 outputs counted too
    assert report.sparse_flops == report.flops - 16 * 32 // 2


def test_recurrent_flops_are_per_token_like_count_macs() -> None:
    import torch_pruning.utils.op_counter as op_counter

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(5, 6, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    op_counter.CUSTOM_MODULES_MAPPING = {}  # as Torch-Pruning leaves it after any count
    report = sparsity_report(Encoder(), torch.zeros(3, 7, 5))
    ih, hh = report.layers
    per_token = 4 * 6 * (5 + 6) + 2 * 4 * 6  # as test_measure's hand count
    assert ih.flops + hh.flops == pytest.approx(7 * per_token, abs=1)
    assert ih.flops / hh.flops == pytest.approx(5 / 6, rel=1e-2)  # shared by weight size
    assert report.flops == 7 * per_token


def test_report_of_a_pruned_zoo_model_matches_the_pruner():
    for name in ("seed-cnn", "lstm", "transformer"):
        torch.manual_seed(0)
        model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
        pruner = Pruner(model, sparsity=0.8)
        pruner.step()
        report = sparsity_report(model, torch.zeros(1, 1, 8, 8))
        assert report.sparsity == pytest.approx(pruner.current_sparsity, abs=1e-4), name
        assert [row.name for row in report.layers] == [t.name for t in pruner.targets]
        assert all(row.flops for row in report.layers), name
        assert report.sparse_flops < report.flops


def test_attention_flops_are_shared_between_in_and_out_projection():
    model = build_model("transformer", input_shape=(1, 8, 8), num_classes=10, depth=1)
    report = sparsity_report(model, torch.zeros(1, 1, 8, 8))
    rows = {row.name: row for row in report.layers}
    in_proj, out_proj = rows["blocks.0.attn.in_proj_weight"], rows["blocks.0.attn.out_proj.weight"]
    assert in_proj.flops == pytest.approx(3 * out_proj.flops, rel=1e-3)


def test_to_dict_is_json_and_tables_render():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    report = sparsity_report(model, torch.zeros(1, 4))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["shape"] == [4, 4] and data["params"] == 24
    markdown = report.to_markdown()
    assert markdown.splitlines()[0].startswith("| layer | shape | params | zeros | sparsity | FLOPs")
    assert "| **total** |" in markdown and str(report) == markdown
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report.to_rich())
    assert "0.weight" in console.export_text()


def test_a_linear_row_counts_its_bias_per_example_at_batch_32() -> None:
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    rows = {row.name: row for row in sparsity_report(model, torch.zeros(32, 256)).layers}
    assert rows["0.weight"].flops == 256 * 64 + 64  # not 16,386: the bias once per batch
    assert rows["2.weight"].flops == 64 * 10 + 10
