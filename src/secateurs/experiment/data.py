"""Datasets as in-memory tensors with a stratified train/validation/test split.

Built in: scikit-learn's digits (8x8, 1797 images, shipped inside scikit-learn) and a synthetic
sequence-memory task generated locally. Through torchvision (optional ``vision`` extra): MNIST,
Fashion-MNIST and CIFAR-10 from ``data_dir``, downloaded only when asked to. A user's own data:
an ``.npz`` or ``.safetensors`` file holding ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from secateurs.errors import SecateursError
from secateurs.experiment.config import DataConfig

DATASETS = ("digits", "sequence", "mnist", "fashion-mnist", "cifar10")


@dataclass
class Split:
    """Inputs and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A classification task held in memory: three splits, the input shape and the class count."""

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int


def batches(
    split: Split, batch_size: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1, augment: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``split``: shuffled by ``seed`` (None keeps the order), one shard per rank.

    ``augment`` shifts images by up to one pixel (:func:`random_shift`), drawn from ``seed``.

    Every rank draws the same permutation and takes every ``world_size``-th index from ``rank``
    on (as ``DistributedSampler`` does), so ranks see disjoint data of equal size.
    """
    n = len(split)
    if seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = torch.cat([order, order[: per_rank * world_size - n]])[rank::world_size]
    shift_rng = torch.Generator().manual_seed((seed or 0) + 7919)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        yield (random_shift(x, shift_rng) if augment else x), split.y[idx]


def random_shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Translate each image in a (B, C, H, W) batch by up to ``pixels`` in each direction.

    Borders are replicated, so a shifted digit keeps its background. Other shapes pass through.
    """
    if x.dim() != 4 or pixels == 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def _stratified(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every split by the training split's per-channel mean and std."""
    axes = tuple(i for i in range(train.ndim) if i != 1) if train.ndim == 4 else (0,)
    # nan-aware: a few non-finite examples must not poison every example's scaling
    finite = np.where(np.isfinite(train), train, np.nan)
    mean = np.nanmean(finite, axis=axes, keepdims=True)
    std = np.nanstd(finite, axis=axes, keepdims=True) + 1e-6
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, cfg: DataConfig) -> Dataset:
    if cfg.limit and cfg.limit < len(y_train):
        x_train, _, y_train, _ = _stratified(x_train, y_train, 1 - cfg.limit / len(y_train), cfg.split_seed)
    x_tr, x_val, y_tr, y_val = _stratified(x_train, y_train, cfg.val_fraction, cfg.split_seed)
    x_tr, x_val, x_te = _standardise(x_tr, x_val, x_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))

    return Dataset(name, split(x_tr, y_tr), split(x_val, y_val), split(x_te, y_test), tuple(x_tr.shape[1:]), num_classes)


def digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 8x8 digits, as (1, 8, 8) images, split train/validation/test by class."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _stratified(x, y, cfg.test_fraction, cfg.split_seed)
    return _from_arrays("digits", x_train, y_train, x_test, y_test, cfg)


def sequence_task(cfg: DataConfig, *, n: int = 3000, steps: int = 8, features: int = 4) -> Dataset:
    """A memory task: the class is the channel that is largest at the first step.

    Every later step is noise, so a recurrent net must carry the first step across ``steps``
    steps of recurrence: gradients through a plain tanh RNN at a high learning rate explode,
    which is the setting where clipping decides whether training works.
    """
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(n, steps, features)).astype(np.float32)
    y = x[:, 0, :].argmax(axis=1).astype(np.int64)
    x_train, x_test, y_train, y_test = _stratified(x, y, cfg.test_fraction, cfg.split_seed)
    return _from_arrays("sequence", x_train, y_train, x_test, y_test, cfg)


def _arrays_file(path: Path) -> dict[str, np.ndarray]:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in keys if k in f.files}
        else:
            from safetensors.numpy import load_file

            arrays = {k: v for k, v in load_file(str(path)).items() if k in keys}
    except (OSError, ValueError) as exc:
        raise SecateursError(f"data.name: {str(path)!r} could not be read ({exc}); allowed: .npz or .safetensors with {', '.join(keys)}") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SecateursError(f"data.name: {str(path)!r} lacks {', '.join(missing)}; allowed: a file holding {', '.join(keys)}")
    return arrays


def user_file(path: Path, cfg: DataConfig) -> Dataset:
    """A user's own tensors from ``.npz`` or ``.safetensors``: ``x_train, y_train, x_test, y_test``."""
    a = _arrays_file(path)
    x_train, x_test = a["x_train"].astype(np.float32), a["x_test"].astype(np.float32)
    if x_train.ndim == 3:  # (N, H, W) grey images
        x_train, x_test = x_train[:, None], x_test[:, None]
    return _from_arrays(path.stem, x_train, a["y_train"].astype(np.int64), x_test, a["y_test"].astype(np.int64), cfg)


TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}
"""Where torchvision looks inside ``data_dir``: ``MNIST/raw``, ``FashionMNIST/raw`` (idx-ubyte
files), ``cifar-10-batches-py`` (the official pickled batches)."""


def _gunzip_idx_files(raw: Path) -> None:
    """Unpack ``*.gz`` idx files in ``raw`` that have no unpacked twin yet.

    torchvision reads only unpacked idx files unless it downloads, so files fetched by hand from
    the official mirrors (gzipped) would be reported missing; they are unpacked in place instead.
    """
    import gzip
    import shutil

    if not raw.is_dir():
        return
    for packed in sorted(raw.glob("*-ubyte.gz")):
        unpacked = packed.with_suffix("")
        if not unpacked.exists():
            tmp = unpacked.with_name(f".{unpacked.name}.tmp")
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(unpacked)


def torchvision_dataset(name: str, cfg: DataConfig) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10 from ``cfg.data_dir`` via torchvision; never a silent download.

    CIFAR-10's official files are Python pickles, which torchvision unpickles: point
    ``data_dir`` only at files from a source you trust.
    """
    if not cfg.data_dir:
        raise SecateursError(f"data.data_dir: got ''; allowed: the folder holding {TORCHVISION_FOLDERS[name]}/ (and data.download=true to fetch {name} into it)")
    root = Path(cfg.data_dir)
    if not root.is_dir() and not cfg.download:
        raise SecateursError(f"data.data_dir: {str(root)!r} does not exist; allowed: an existing folder, or set data.download=true")
    try:
        from torchvision import datasets
    except ImportError:
        raise SecateursError(f"data.name: {name!r} needs torchvision; install the extra: pip install 'secateurs[vision]'") from None
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    if name != "cifar10":
        try:
            _gunzip_idx_files(root / TORCHVISION_FOLDERS[name] / "raw")
        except (OSError, EOFError) as exc:
            raise SecateursError(f"data.data_dir: a .gz file in {str(root / TORCHVISION_FOLDERS[name] / 'raw')!r} could not be unpacked ({exc})") from None
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError, ValueError) as exc:
        hint = "" if cfg.download else "; set data.download=true to fetch it"
        raise SecateursError(f"data.data_dir: {name} not found or unreadable in {str(root)!r} ({exc}){hint}") from None

    def arrays(ds: object) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data, dtype=np.float32) / 255.0  # type: ignore[attr-defined]
        x = x.transpose(0, 3, 1, 2) if x.ndim == 4 else x[:, None]  # CIFAR is stored HWC
        return np.ascontiguousarray(x), np.asarray(ds.targets, dtype=np.int64)  # type: ignore[attr-defined]

    x_train, y_train = arrays(train)
    x_test, y_test = arrays(test)
    return _from_arrays(name, x_train, y_train, x_test, y_test, cfg)


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset ``cfg.name`` names: a built-in, a torchvision dataset, or a file path."""
    if cfg.name == "digits":
        return digits(cfg)
    if cfg.name == "sequence":
        return sequence_task(cfg)
    if cfg.name in ("mnist", "fashion-mnist", "cifar10"):
        return torchvision_dataset(cfg.name, cfg)
    path = Path(cfg.name)
    if path.suffix in (".npz", ".safetensors"):
        if not path.is_file():
            raise SecateursError(f"data.name: file {cfg.name!r} does not exist")
        return user_file(path, cfg)
    raise SecateursError(f"data.name: got {cfg.name!r}; allowed: {', '.join(DATASETS)} or a .npz/.safetensors file")
