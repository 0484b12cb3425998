"""save_structured / load_structured: shapes as JSON + safetensors weights, no pickled code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from secateurs.errors import SecateursError
from secateurs.experiment.models import build_model
from secateurs.prune.surgery import pruning_record, structured
from secateurs.prune.surgery.checkpoint import load_structured, save_structured

DIGITS = (1, 8, 8)
ZOO = ["mlp", "seed-cnn", "vgg11-bn", "resnet20", "mobilenet", "lstm", "rnn", "transformer"]
SMALL = {"vgg11-bn": {"width": 0.25}, "mobilenet": {"width": 8}}


def fresh(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=DIGITS, num_classes=10, **SMALL.get(name, {}))


X = torch.randn(3, *DIGITS, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ZOO)
def test_a_pruned_zoo_model_reloads_into_a_fresh_one_with_identical_outputs(name: str, tmp_path: Path) -> None:
    small = structured(fresh(name), X, sparsity=0.5, scope="global").eval()
    save_structured(small, tmp_path / "m.safetensors")
    loaded = load_structured(tmp_path / "m.safetensors", fresh(name, seed=7)).eval()
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in small.parameters()]
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def test_the_checkpoint_holds_layer_shapes_as_json_and_no_pickle(tmp_path: Path) -> None:
    small = structured(fresh("transformer"), X, sparsity=0.5)
    path = tmp_path / "t.safetensors"
    save_structured(small, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["secateurs"])
    assert meta["format"] == "secateurs.structured" and meta["model"] == "TransformerClassifier"
    assert meta["layers"]["blocks.0.attn"]["num_heads"] == 2
    assert meta["layers"]["blocks.0.fc1"] == {"in_features": 32, "out_features": 64}
    assert meta["layers"]["norm"]["normalized_shape"] == [32]


def test_reloaded_models_keep_their_record_so_ratios_stay_cumulative(tmp_path: Path) -> None:
    small = structured(fresh("seed-cnn"), X, sparsity=0.25)
    save_structured(small, tmp_path / "s.safetensors")
    loaded = load_structured(tmp_path / "s.safetensors", fresh("seed-cnn"))
    assert pruning_record(loaded) == pruning_record(small)
    again = structured(loaded, X, sparsity=0.5)
    assert [m.out_channels for m in again.features if isinstance(m, nn.Conv2d)] == [16, 32, 32]


def test_batchnorm_running_statistics_round_trip(tmp_path: Path) -> None:
    model = fresh("resnet20").train()
    model(torch.randn(8, *DIGITS))
    small = structured(model, X, sparsity=0.5)
    save_structured(small, tmp_path / "r.safetensors")
    loaded = load_structured(tmp_path / "r.safetensors", fresh("resnet20"))
    assert torch.equal(loaded.bn1.running_var, small.bn1.running_var)
    assert loaded.bn1.num_features == small.bn1.num_features


def test_the_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    small = structured(fresh("mlp"), X, sparsity=0.5)
    path = tmp_path / "sub" / "m.safetensors"
    save_structured(small, path)
    save_structured(small, path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]


def test_loading_into_another_architecture_is_refused(tmp_path: Path) -> None:
    save_structured(structured(fresh("mlp"), X, sparsity=0.5), tmp_path / "m.safetensors")
    with pytest.raises(SecateursError, match=r"model: got SeedCNN.*saved from MLP"):
        load_structured(tmp_path / "m.safetensors", fresh("seed-cnn"))


def test_loading_into_a_differently_configured_model_is_refused(tmp_path: Path) -> None:
    save_structured(structured(fresh("mlp"), X, sparsity=0.5), tmp_path / "m.safetensors")
    other = build_model("mlp", input_shape=DIGITS, num_classes=10, hidden=(300,))
    with pytest.raises(SecateursError, match="model: "):
        load_structured(tmp_path / "m.safetensors", other)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecateursError, match="no such file"):
        load_structured(tmp_path / "nope.safetensors", fresh("mlp"))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SecateursError, match="not a safetensors file"):
        load_structured(tmp_path / "junk.safetensors", fresh("mlp"))


def test_a_plain_safetensors_file_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SecateursError, match="without structured-pruning metadata"):
        load_structured(tmp_path / "plain.safetensors", fresh("mlp"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_structured_file_takes_the_umask_and_identical_models_write_identical_bytes(tmp_path: Path, umask: int) -> None:
    import os

    small = structured(fresh("mlp"), X, sparsity=0.5)
    previous = os.umask(umask)
    try:
        save_structured(small, tmp_path / "a.safetensors")
        save_structured(small, tmp_path / "b.safetensors")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
