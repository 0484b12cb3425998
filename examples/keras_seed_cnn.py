"""The seeds' CIFAR-10 CNN (tf.keras Sequential + compile + fit), clipped and pruned by secateurs.

The model, compile and fit are the background article's; the two lines marked ``# secateurs``
are all that changes: the optimizer is wrapped (global-norm clipping, NaN steps skipped) and a
pruning callback (TFMOT's polynomial decay to 90%) joins ``fit``. Runs on any Keras 3 backend::

    KERAS_BACKEND=torch python examples/keras_seed_cnn.py            # digits, upsampled to 32x32
    KERAS_BACKEND=jax python examples/keras_seed_cnn.py --cifar DIR  # DIR/cifar-10-batches-py

CIFAR-10 is used where its files are (``--cifar`` or ``$CIFAR10_DIR``, holding the official
``cifar-10-batches-py`` pickles; nothing is downloaded), the digits of scikit-learn otherwise.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import keras
import numpy as np

import secateurs.keras as sk


def seed_cnn() -> keras.Model:
    """The CNN of the seeds' CIFAR-10 example."""
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR-10 pickles hold numpy arrays and lists: refuse any other global (code)."""

    ALLOWED = frozenset(
        {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
         ("numpy._core.multiarray", "_reconstruct")}
    )  # fmt: skip

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR-10 batch file")


def load_cifar10(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The official ``cifar-10-batches-py`` pickles, read as ``keras.datasets.cifar10`` reads
    them (channels last), scaled to [0, 1]."""

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        x = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype("float32") / 255.0
        return x, np.asarray(d[b"labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, batch("test_batch")


def load_digits(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits, upsampled to 32x32x3 so the seeds' CNN runs unchanged."""
    from sklearn.datasets import load_digits as digits

    d = digits()
    x = (d.images / 16.0).astype("float32")
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], d.target[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def find_cifar(arg: str | None) -> Path | None:
    for root in (arg, os.environ.get("CIFAR10_DIR"), "data"):
        if root:
            folder = Path(root)
            folder = folder if folder.name == "cifar-10-batches-py" else folder / "cifar-10-batches-py"
            if (folder / "data_batch_1").exists():
                return folder
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", help="folder holding cifar-10-batches-py (default: $CIFAR10_DIR, data/)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    folder = find_cifar(args.cifar)
    (train_images, train_labels), (test_images, test_labels) = load_cifar10(folder) if folder else load_digits()
    print(f"backend {keras.backend.backend()}, data {'CIFAR-10' if folder else 'digits (32x32)'}")
    keras.utils.set_random_seed(0)

    steps = args.epochs * int(np.ceil(len(train_images) / 32))
    end_step = max(1, int(0.7 * steps))  # prune during the first 70% of training,
    frequency = max(1, min(100, end_step // 10))  # in about ten steps
    model = seed_cnn()
    model.compile(
        optimizer=sk.wrap(keras.optimizers.Adam(), sk.GlobalNorm(1.0), nonfinite="skip"),  # secateurs
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        train_images,
        train_labels,
        epochs=args.epochs,
        validation_data=(test_images, test_labels),
        callbacks=[sk.PolynomialDecay(final_sparsity=args.sparsity, end_step=end_step, frequency=frequency)],  # secateurs
    )

    _, accuracy = model.evaluate(test_images, test_labels, verbose=0)
    print(sk.to_markdown(sk.sparsity_report(model)))
    print(f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
