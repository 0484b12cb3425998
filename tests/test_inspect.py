"""`secateurs inspect`: a per-tensor table for our sparse checkpoints and for plain safetensors files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from secateurs import prune
from secateurs.cli import app


def _inspect(path: Path) -> object:
    return CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})


def _table_row(output: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is ``name``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{output}")


@pytest.fixture
def sparse_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    prune.Pruner(model, sparsity=0.75, scope="layer").step()
    path = tmp_path / "sparse.safetensors"
    prune.save(model, path)
    return path


def test_sparse_checkpoint_rows_show_shape_params_zeros_sparsity_bytes_dtype(sparse_checkpoint: Path) -> None:
    result = _inspect(sparse_checkpoint)
    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "0.weight") == ["0.weight", "64x32", "2,048", "1,536", "75.00%", _bytes(sparse_checkpoint, "0.weight"), "float32"]
    assert _table_row(result.stdout, "2.bias")[1:3] == ["10", "10"]
    total = _table_row(result.stdout, "total")
    assert total[2] == f"{32 * 64 + 64 + 64 * 10 + 10:,}" and total[3] == f"{1536 + 480:,}"


def _bytes(path: Path, name: str) -> str:
    row = next(r for r in prune.inspect_checkpoint(path) if r["name"] == name)
    return f"{row['bytes']:,}"


def test_sparse_tensors_take_fewer_bytes_than_dense_ones(sparse_checkpoint: Path) -> None:
    row = next(r for r in prune.inspect_checkpoint(sparse_checkpoint) if r["name"] == "0.weight")
    assert row["encoding"] == "bitmask" and row["bytes"] < 0.3 * 2048 * 4


def test_plain_dense_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "dense.safetensors"
    weight = torch.ones(8, 4)
    weight[0] = 0
    save_file({"layer.weight": weight, "layer.bias": torch.zeros(8, dtype=torch.float16), "step": torch.tensor(3)}, str(path))
    result = _inspect(path)
    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "layer.weight") == ["layer.weight", "8x4", "32", "4", "12.50%", "128", "float32"]
    assert _table_row(result.stdout, "layer.bias") == ["layer.bias", "8", "8", "8", "100.00%", "16", "float16"]
    assert _table_row(result.stdout, "step")[1] == "scalar"


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "no such file"), (b"definitely not safetensors", "is not a safetensors file"), (b"", "is not a safetensors file")],
)
def test_what_is_not_a_checkpoint_exits_2_with_one_line(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    result = _inspect(path)
    assert result.exit_code == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inspect_in_a_real_process(sparse_checkpoint: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "secateurs", "inspect", str(sparse_checkpoint)], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "0.weight" in result.stdout and "75.00%" in result.stdout
