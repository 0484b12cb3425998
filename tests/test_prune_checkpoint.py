"""Sparse safetensors checkpoints: bit-exact round trip, size, atomic writes, inspection, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from secateurs.errors import SecateursError
from secateurs.experiment.models import build_model
from secateurs.prune import Pruner, inspect_checkpoint, load, read_checkpoint, read_metadata, save


def pruned_cnn(sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vgg11-bn", input_shape=(1, 8, 8), num_classes=10, width=0.25)
    model(torch.randn(4, 1, 8, 8))  # non-trivial BatchNorm buffers
    Pruner(model, sparsity=sparsity).step()
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def test_round_trip_is_bit_exact_for_a_pruned_model(tmp_path):
    model = pruned_cnn()
    save(model, tmp_path / "m.safetensors")
    fresh = build_model("vgg11-bn", input_shape=(1, 8, 8), num_classes=10, width=0.25)
    load(tmp_path / "m.safetensors", fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), name


def test_round_trip_keeps_negative_zero_nan_payloads_and_every_dtype(tmp_path):
    state = {
        "f32": torch.tensor([0.0, -0.0, float("nan"), float("-inf"), 1.5] + [0.0] * 60),
        "f16": torch.cat([torch.randn(5), torch.zeros(100)]).half(),
        "bf16": torch.cat([torch.randn(5), torch.zeros(100)]).bfloat16(),
        "f64": torch.cat([torch.randn(5), torch.zeros(100)]).double().view(5, 21),
        "dense_f32": torch.randn(3, 4),
        "int": torch.arange(10),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    state["f32"][2] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)  # NaN payload
    save(state, tmp_path / "s.safetensors")
    restored = read_checkpoint(tmp_path / "s.safetensors")
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(bits(restored[name]), bits(tensor)), name


def test_fp32_at_90_percent_is_at_most_015_of_the_dense_file(tmp_path):
    model = pruned_cnn(0.9)
    sparse = save(model, tmp_path / "sparse.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    dense = (tmp_path / "dense.safetensors").stat().st_size
    assert sparse == (tmp_path / "sparse.safetensors").stat().st_size
    assert sparse <= 0.15 * dense, sparse / dense


def test_tensors_with_few_zeros_stay_dense(tmp_path):
    save({"w": torch.randn(100)}, tmp_path / "d.safetensors")
    assert [row["encoding"] for row in inspect_checkpoint(tmp_path / "d.safetensors")] == ["dense"]


def test_tied_weights_are_saved_and_load_into_a_tied_model(tmp_path):
    def tied() -> nn.Module:
        model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
        model["head"].weight = model["embed"].weight
        return model

    model = tied()
    save(model, tmp_path / "t.safetensors")
    fresh = tied()
    load(tmp_path / "t.safetensors", fresh)
    assert torch.equal(fresh["head"].weight, model["embed"].weight)
    assert fresh["head"].weight is fresh["embed"].weight


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save({"w": torch.ones(10)}, path)
    original = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("secateurs.prune.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save({"w": torch.zeros(10)}, path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_metadata_travels_in_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save(nn.Linear(3, 3), path, metadata={"config": json.dumps({"sparsity": 0.9})})
    assert json.loads(read_metadata(path)["config"]) == {"sparsity": 0.9}
    with pytest.raises(SecateursError, match="metadata"):
        save(nn.Linear(3, 3), path, metadata={"secateurs.format": "x"})
    with pytest.raises(SecateursError, match="metadata"):
        save(nn.Linear(3, 3), path, metadata={"n": 1})  # type: ignore[dict-item]


def test_inspect_reads_a_sparse_checkpoint_without_a_model(tmp_path):
    model = pruned_cnn(0.9)
    save(model, tmp_path / "m.safetensors")
    rows = {row["name"]: row for row in inspect_checkpoint(tmp_path / "m.safetensors")}
    assert list(rows) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        row = rows[name]
        assert row["shape"] == list(tensor.shape)
        assert row["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert row["params"] == tensor.numel()
        assert row["zeros"] == int((tensor == 0).sum()), name
    weight = rows["features.0.weight"]
    assert weight["encoding"] == "bitmask" and weight["bytes"] < weight["params"] * 4
    json.dumps(list(rows.values()))


def test_inspect_reads_a_plain_dense_safetensors_file(tmp_path):
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    save_file({"w": weight, "b": torch.zeros(3, dtype=torch.float16)}, str(tmp_path / "plain.safetensors"))
    rows = {row["name"]: row for row in inspect_checkpoint(tmp_path / "plain.safetensors")}
    assert rows["w"] == {
        "name": "w", "shape": [2, 2], "dtype": "float32", "params": 4, "zeros": 2,
        "sparsity": 0.5, "bytes": 16, "encoding": "dense", "nonfinite": 0, "in_model": True,
    }
    assert rows["b"]["zeros"] == 3 and rows["b"]["bytes"] == 6
    assert torch.equal(read_checkpoint(tmp_path / "plain.safetensors")["w"], weight)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    for fn in (inspect_checkpoint, read_checkpoint, read_metadata):
        with pytest.raises(SecateursError, match=r"checkpoint: got .*not a safetensors file"):
            fn(junk)
    with pytest.raises(SecateursError, match=r"checkpoint: got .*no such file"):
        inspect_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(SecateursError, match="not a safetensors file"):
        load(junk, nn.Linear(2, 2))


def test_a_corrupt_layout_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"secateurs.format": "secateurs.sparse/1", "secateurs.layout": "{"})
    with pytest.raises(SecateursError, match="corrupt secateurs layout"):
        read_checkpoint(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"secateurs.format": "secateurs.sparse/9"})
    with pytest.raises(SecateursError, match="format"):
        read_checkpoint(path)


def test_loading_into_the_wrong_model_names_the_checkpoint(tmp_path):
    save(nn.Linear(3, 3), tmp_path / "m.safetensors")
    with pytest.raises(SecateursError, match="does not fit Linear"):
        load(tmp_path / "m.safetensors", nn.Linear(4, 3))
    with pytest.raises(SecateursError, match="does not fit Sequential"):
        load(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_saved_checkpoint_takes_the_process_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        save(nn.Linear(4, 4), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


_SAVE_IN_A_FRESH_PROCESS = """
import sys, torch
from torch import nn
from safetensors.torch import save_file
from secateurs.prune import Pruner, save
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
Pruner(model, sparsity=0.8).step()
metadata = {"zeta": "1", "alpha": "2", "mid": "3"}
save(model, sys.argv[1], metadata=metadata)
save_file({"w": torch.zeros(2)}, sys.argv[2], metadata=metadata | {"secateurs.format": "", "secateurs.layout": ""})
"""


@pytest.mark.slow
def test_the_same_model_saved_by_different_processes_is_byte_identical_with_sorted_metadata(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # safetensors orders metadata by a hash seeded per process: these two seeds order the same
    # keys differently in a plain save_file (checked below), so the test can see the difference
    paths = [tmp_path / f"m{seed}.safetensors" for seed in (1, 2)]
    stock = [tmp_path / f"stock{seed}.safetensors" for seed in (1, 2)]
    for seed, path, plain in zip((1, 2), paths, stock, strict=True):
        env = os.environ | {"PYTHONHASHSEED": str(seed)}
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_FRESH_PROCESS, str(path), str(plain)], check=True, timeout=120, env=env)
    assert stock[0].read_bytes() != stock[1].read_bytes()
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    size = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + size])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) == ["alpha", "mid", "secateurs.format", "secateurs.layout", "zeta"]
    assert next(iter(header)) == "__metadata__"
    assert read_metadata(paths[0]) == {"zeta": "1", "alpha": "2", "mid": "3"}
