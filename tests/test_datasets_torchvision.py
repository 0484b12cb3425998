"""MNIST, Fashion-MNIST and CIFAR-10 load from tiny files written in their official on-disk formats.

MNIST and Fashion-MNIST: big-endian idx-ubyte files (as published, or gzipped as downloaded) in
``<data_dir>/MNIST/raw`` and ``<data_dir>/FashionMNIST/raw``. CIFAR-10: the pickled batches of
``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``). Nothing is ever
downloaded: every download function of torchvision is replaced by one that fails the test.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.experiment.config import DataConfig
from secateurs.experiment.data import load_dataset

# --- writers of the official formats (no torchvision needed) ----------------------------------


def idx_images(images: np.ndarray) -> bytes:
    """idx3-ubyte: magic 0x00000803, then N, rows, cols as big-endian int32, then the pixels."""
    n, rows, cols = images.shape
    return struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """idx1-ubyte: magic 0x00000801, then N as big-endian int32, then one byte per label."""
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def tiny_mnist(root: Path, folder: str, *, gz: bool, n_train: int = 40, n_test: int = 10) -> dict[str, np.ndarray]:
    """Write a 28x28 MNIST-format dataset whose image i has brightness growing with i."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28)),
        "y_train": np.arange(n_train) % 10,
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28)),
        "y_test": (np.arange(n_test) * 3) % 10,
    }
    files = {
        "train-images-idx3-ubyte": idx_images(arrays["x_train"]),
        "train-labels-idx1-ubyte": idx_labels(arrays["y_train"]),
        "t10k-images-idx3-ubyte": idx_images(arrays["x_test"]),
        "t10k-labels-idx1-ubyte": idx_labels(arrays["y_test"]),
    }
    for name, data in files.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return arrays


def cifar_batch(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """One pickled CIFAR-10 batch: rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each
    32x32 row-major), as the official Python 2 pickles (protocol 2, str keys)."""
    rows = images.reshape(len(images), 3 * 32 * 32).astype(np.uint8)
    return pickle.dumps({"batch_label": name, "labels": labels.tolist(), "data": rows, "filenames": [f"{i}.png" for i in range(len(labels))]}, protocol=2)


def tiny_cifar(root: Path, *, per_batch: int = 10, n_test: int = 10) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py: red varies along the width only, green along the height only,
    blue is constant per image, so a wrong axis order shows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def images(n: int, offset: int) -> np.ndarray:
        x = np.zeros((n, 3, 32, 32), np.uint8)
        x[:, 0] = (np.arange(32) * 8)[None, None, :]
        x[:, 1] = (np.arange(32) * 8)[None, :, None]
        x[:, 2] = ((np.arange(n) + offset) * 5 % 256)[:, None, None]
        return x

    train_y = []
    for b in range(1, 6):
        y = (np.arange(per_batch) + b) % 10
        train_y.append(y)
        (folder / f"data_batch_{b}").write_bytes(cifar_batch(images(per_batch, b * per_batch), y, f"training batch {b} of 5"))
    test_y = np.arange(n_test) % 10
    (folder / "test_batch").write_bytes(cifar_batch(images(n_test, 0), test_y, "testing batch 1 of 1"))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"y_train": np.concatenate(train_y), "y_test": test_y}


# --- without torchvision: the folder is checked first ----------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_dataset_without_data_dir_is_named(name: str) -> None:
    with pytest.raises(SecateursError, match=r"data.data_dir: got ''"):
        load_dataset(DataConfig(name=name))


def test_missing_data_dir_is_named_without_download(tmp_path: Path) -> None:
    with pytest.raises(SecateursError, match=r"does not exist; allowed: an existing folder, or set data.download=true"):
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path / "nowhere")))


# --- with torchvision: the real loaders on the official formats -------------------------------


@pytest.fixture
def torchvision_offline(monkeypatch: pytest.MonkeyPatch) -> object:
    """torchvision, with every download entry point failing the test."""
    tv = pytest.importorskip("torchvision")
    from torchvision.datasets import cifar, mnist, utils

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download")

    for module in (utils, mnist, cifar):
        for fn in ("download_url", "download_and_extract_archive"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, no_download)
    return tv


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
def test_mnist_format_loads(torchvision_offline: object, tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    arrays = tiny_mnist(tmp_path, folder, gz=gz)
    ds = load_dataset(DataConfig(name=name, data_dir=str(tmp_path), val_fraction=0.25))
    assert ds.name == name and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 10)
    assert torch.equal(ds.test.y, torch.from_numpy(arrays["y_test"]))
    # standardisation is one increasing affine map per channel: the test pixels keep their order
    raw = torch.from_numpy(arrays["x_test"]).float().flatten()
    loaded = ds.test.x.flatten()
    assert torch.equal(torch.argsort(raw, stable=True), torch.argsort(loaded, stable=True))


def test_gzipped_idx_files_are_unpacked_beside_them(torchvision_offline: object, tmp_path: Path) -> None:
    tiny_mnist(tmp_path, "MNIST", gz=True)
    load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path), val_fraction=0.25))
    raw = tmp_path / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").read_bytes() == gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())


def test_cifar10_batches_load_channels_first(torchvision_offline: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import cifar

    # torchvision checks the md5 of the real 30 MB batches; the parsing below is its own
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    labels = tiny_cifar(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), val_fraction=0.2))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 10)
    assert torch.equal(ds.test.y, torch.from_numpy(labels["y_test"]))
    x = ds.test.x
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    assert torch.all(red.diff(dim=2) > 0) and torch.all(red.diff(dim=1) == 0)  # red grows along the width
    assert torch.all(green.diff(dim=1) > 0) and torch.all(green.diff(dim=2) == 0)  # green along the height
    assert torch.all(blue.flatten(1).std(dim=1) == 0)  # blue is flat within each image


def test_missing_files_without_download_say_how_to_fetch(torchvision_offline: object, tmp_path: Path) -> None:
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(SecateursError, match=r"data.data_dir: mnist not found .* set data.download=true"):
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
