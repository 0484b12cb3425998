"""`secateurs inspect`: a per-tensor table for our sparse checkpoints and for plain safetensors files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from secateurs import prune
from secateurs.cli import app
from secateurs.errors import SecateursError
from secateurs.serialization import save_state


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
    assert _table_row(result.stdout, "0.weight") == ["0.weight", "64x32", "2,048", "1,536", "75.00%", _bytes(sparse_checkpoint, "0.weight"), "float32", ""]
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
    assert _table_row(result.stdout, "layer.weight") == ["layer.weight", "8x4", "32", "4", "12.50%", "128", "float32", ""]
    assert _table_row(result.stdout, "layer.bias") == ["layer.bias", "8", "8", "8", "100.00%", "16", "float16", ""]
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


def _real_inspect(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "secateurs", "inspect", *args], capture_output=True, text=True, timeout=120, env=env)


def test_long_tensor_names_are_shown_whole_on_an_80_column_terminal(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("encoder_block_with_a_long_name", nn.Sequential(nn.Linear(4, 4)))
    path = tmp_path / "m.safetensors"
    prune.save(model, path)
    result = _real_inspect(str(path))
    assert result.returncode == 0, result.stderr
    assert "encoder_block_with_a_long_name.0.weight" in result.stdout
    assert "…" not in result.stdout


def test_a_training_state_file_shows_each_tensor_by_its_place_in_the_state_in_order(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])  # 12 tensors: t0..t11 sort as t0, t1, t10, ...
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_state(path, {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    names = [row["name"] for row in prune.inspect_checkpoint(path)]
    expected = [f"model/{k}" for k in model.state_dict()] + [f"optimizer/state/{i}/momentum_buffer" for i in range(12)]
    assert names == expected
    result = _inspect(path)
    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "model/5.bias")[1:3] == ["2", "2"]


def _corrupt_bitmask(path: Path, name: str) -> Path:
    """A copy of ``path`` with one more bit set in ``name``'s bitmask (a flipped bit on disk)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    packed = tensors[f"{name}::bitmask"].clone()
    byte = int((packed != 0xFF).nonzero()[0])
    packed[byte] |= (~packed[byte]) & -(~packed[byte])  # the lowest clear bit
    tensors[f"{name}::bitmask"] = packed
    bad = path.with_name("corrupt.safetensors")
    save_file(tensors, str(bad), metadata=metadata)
    return bad


def test_a_corrupted_bitmask_exits_2_with_one_line_as_read_checkpoint_raises(sparse_checkpoint: Path) -> None:
    bad = _corrupt_bitmask(sparse_checkpoint, "0.weight")
    with pytest.raises(SecateursError, match="does not match its bitmask"):
        prune.read_checkpoint(bad)
    result = _inspect(bad)
    assert result.exit_code == 2
    assert "'0.weight' does not match its bitmask" in result.stderr and "bits set for" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_nan_and_inf_weights_are_counted_and_exit_2_with_one_line(tmp_path: Path) -> None:
    model = nn.Linear(8, 8)
    with torch.no_grad():
        model.weight[0, :3] = float("nan")
        model.weight[1, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    prune.save(model, path)
    result = _inspect(path)
    assert result.exit_code == 2
    assert _table_row(result.stdout, "weight")[-1] == "4"
    assert _table_row(result.stdout, "bias")[-1] == ""
    assert "NaN or infinite weights in 1 tensors: weight (4)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_json_output_is_the_library_rows_and_the_totals(sparse_checkpoint: Path) -> None:
    import json

    result = _inspect_json(sparse_checkpoint)
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    rows = prune.inspect_checkpoint(sparse_checkpoint)
    assert parsed["tensors"] == rows
    assert parsed["total"]["params"] == 32 * 64 + 64 + 64 * 10 + 10 and parsed["total"]["zeros"] == 1536 + 480


def _inspect_json(path: Path) -> object:
    return CliRunner().invoke(app, ["inspect", "--json", str(path)])


def test_a_folder_is_refused_with_a_file_in_it_that_inspect_then_reads(sparse_checkpoint: Path) -> None:
    result = _inspect(sparse_checkpoint.parent)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "which is a folder" in result.stderr and "no such file" not in result.stderr
    suggested = result.stderr.split("such as ")[1].strip().strip("'")
    assert _inspect(Path(suggested)).exit_code == 0
