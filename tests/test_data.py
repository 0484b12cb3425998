"""Datasets: split sizes and stratification, standardisation, user files, batching."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from secateurs.errors import SecateursError
from secateurs.experiment.config import DataConfig
from secateurs.experiment.data import batches, load_dataset


def test_digits_split_is_stratified_and_complete() -> None:
    ds = load_dataset(DataConfig())
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.test) == math.ceil(0.2 * 1797)  # scikit-learn rounds the test share up
    # stratified: every class's share of the test split is within one example of its overall share
    test_counts = Counter(ds.test.y.tolist())
    train_counts = Counter(ds.train.y.tolist())
    for c in range(10):
        assert abs(test_counts[c] / len(ds.test) - train_counts[c] / len(ds.train)) < 0.02


def test_digits_split_is_fixed_by_split_seed() -> None:
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert torch.equal(a.test.x, b.test.x)
    c = load_dataset(DataConfig(split_seed=1))
    assert not torch.equal(a.test.x, c.test.x)


def test_training_split_is_standardised() -> None:
    ds = load_dataset(DataConfig())
    assert abs(float(ds.train.x.mean())) < 1e-4
    assert abs(float(ds.train.x.std()) - 1) < 1e-2


def test_sequence_task_label_is_argmax_of_first_step() -> None:
    ds = load_dataset(DataConfig(name="sequence"))
    assert ds.input_shape == (8, 4) and ds.num_classes == 4
    # standardisation is an increasing per-feature affine map with equal scales, so the argmax survives it
    raw_argmax = ds.train.x[:, 0, :].argmax(dim=1)
    assert (raw_argmax == ds.train.y).float().mean() > 0.97


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x_train": rng.normal(size=(40, 6, 6)).astype(np.float32),
        "y_train": np.repeat(np.arange(4), 10).astype(np.int64),
        "x_test": rng.normal(size=(8, 6, 6)).astype(np.float32),
        "y_test": np.arange(8).astype(np.int64) % 4,
    }


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_user_tensor_files_load(tmp_path: Path, suffix: str) -> None:
    arrays = _arrays(np.random.default_rng(0))
    path = tmp_path / f"mine{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_file(arrays, str(path))
    ds = load_dataset(DataConfig(name=str(path), val_fraction=0.25))
    assert ds.input_shape == (1, 6, 6) and ds.num_classes == 4
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 8)
    assert torch.equal(ds.test.y, torch.from_numpy(arrays["y_test"]))


def test_user_file_missing_arrays_is_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((4, 2), np.float32))
    with pytest.raises(SecateursError, match="lacks y_train, x_test, y_test"):
        load_dataset(DataConfig(name=str(path)))


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(SecateursError, match=r"data\.name: got 'imagenet'"):
        load_dataset(DataConfig(name="imagenet"))


def test_batches_cover_every_example_once_per_epoch() -> None:
    ds = load_dataset(DataConfig())
    seen = torch.cat([y for _, y in batches(ds.train, 64, seed=3)])
    assert sorted(seen.tolist()) == sorted(ds.train.y.tolist())


def test_rank_shards_are_disjoint_and_equal_sized() -> None:
    ds = load_dataset(DataConfig())
    n = len(ds.train)
    idx = torch.arange(n, dtype=torch.float32)[:, None]
    split = type(ds.train)(idx, ds.train.y)
    shards = [torch.cat([x for x, _ in batches(split, 50, seed=1, rank=r, world_size=2)]).flatten().tolist() for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
