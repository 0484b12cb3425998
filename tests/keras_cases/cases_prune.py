"""Keras pruning: masks that never revive, TFMOT's schedule steps, criteria against numpy
references, save/load, strip and the sparse file, every supported layer type, bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import secateurs.keras as sk
from secateurs.errors import SecateursError
from secateurs.keras._model import sync
from tests.keras_cases.support import compile_, data, mlp, numpy, values

BACKEND = keras.backend.backend()


def _pruned_model(optimizer, sparsity=0.8, **kw):
    model = compile_(mlp(hidden=16), sk.wrap(optimizer, sk.GlobalNorm(5.0)), **kw)
    model.build((None, 6))
    reached = sk.prune_now(model, sparsity)
    return model, reached


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.Adam(1e-2),
        lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.5),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_pruned_weights_never_revive_over_100_steps(make):
    x, y = data(800)
    model, reached = _pruned_model(make())
    assert abs(reached - 0.8) < 0.02
    opt = model.optimizer
    masks = [(v, numpy(m).copy()) for v, m in opt.masks]
    assert len(masks) == 2 and all(m.dtype == np.uint8 for _, m in masks)
    start = values(model.trainable_variables)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 100 steps, one compiled step function
    assert int(numpy(opt.prune_step)) == 100
    for v, m in masks:
        w = numpy(v)
        assert (w[m == 0] == 0).all()  # bit-exact zeros, despite momentum and decay
        assert np.abs(w[m == 1]).min() > 0  # the kept weights train
        np.testing.assert_array_equal(numpy(opt.mask_of(v)), m)
    assert any(not np.allclose(a, b) for a, b in zip(start, values(model.trainable_variables), strict=True))


def tfmot_polynomial_decay(step, initial, final, begin, end, power, frequency):
    """TFMOT 0.8 ``PolynomialDecay.__call__`` (pruning_schedule.py), transcribed."""
    in_range = begin <= step and (step <= end or end < 0)
    turn = (step - begin) % frequency == 0
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    sparsity = (initial - final) * (1 - p) ** power + final
    return in_range and turn, sparsity


def tfmot_step_of_batch(batch):
    """TFMOT 0.8: ``UpdatePruningStep.on_train_begin`` sets ``pruning_step`` to 0, and each
    training call of ``PruneLowMagnitude`` increments it before ``conditional_mask_update``."""
    return batch + 1


class _ZerosPerBatch(keras.callbacks.Callback):
    """Zeros of each kernel as each batch starts (after the schedule's callback has run)."""

    def __init__(self, kernels):
        super().__init__()
        self.kernels, self.zeros = kernels, []

    def on_train_batch_begin(self, batch, logs=None):
        sync(self.model)  # JAX's fit holds the live values in its state
        self.zeros.append([int((numpy(v) == 0).sum()) for v in self.kernels])


def test_polynomial_decay_prunes_on_tfmot_steps_to_tfmot_sparsities():
    x, y = data(64)
    model = compile_(mlp(hidden=40), sk.wrap(keras.optimizers.Adam(1e-3)))
    model.build((None, 6))
    schedule = sk.PolynomialDecay(initial_sparsity=0.2, final_sparsity=0.9, begin_step=3, end_step=27, frequency=6)
    kernels = [v for v in model.trainable_variables if len(v.shape) == 2]
    zeros = _ZerosPerBatch(kernels)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[schedule, zeros])  # batches 0..31
    expected = {}
    for batch in range(32):
        prune, s = tfmot_polynomial_decay(tfmot_step_of_batch(batch), 0.2, 0.9, 3, 27, 3, 6)
        if prune:
            expected[batch] = [max(round(v.size * (1 - s)), 1) for v in map(numpy, kernels)]  # TFMOT's k
    assert list(expected) == [2, 8, 14, 20, 26]
    assert [s for s, _ in schedule.history] == [tfmot_step_of_batch(b) for b in expected] == [3, 9, 15, 21, 27]
    sizes = [int(np.prod(v.shape)) for v in kernels]
    for batch, counts in enumerate(zeros.zeros):
        before = [0, 0] if batch == 0 else zeros.zeros[batch - 1]
        if batch in expected:  # pruned to TFMOT's kept count just before this batch
            assert [n - z for n, z in zip(sizes, counts, strict=True)] == expected[batch]
        else:
            assert counts == before, batch  # no pruning on any other batch


def test_magnitude_prunes_the_smallest_weights_per_layer_and_globally():
    for scope in ("layer", "global"):
        model = compile_(mlp(hidden=16), sk.wrap(keras.optimizers.SGD(0.1)))
        model.build((None, 6))
        before = [numpy(v).copy() for v in model.trainable_variables if len(v.shape) == 2]
        sk.prune_now(model, 0.5, scope=scope)
        after = [numpy(v) for v in model.trainable_variables if len(v.shape) == 2]
        if scope == "layer":
            for b, a in zip(before, after, strict=True):
                kept = np.abs(b[a != 0])
                assert kept.size == b.size // 2 and kept.min() >= np.abs(b[a == 0]).max()
        else:
            allb = np.concatenate([b.ravel() for b in before])
            alla = np.concatenate([a.ravel() for a in after])
            assert (alla != 0).sum() == allb.size // 2
            assert np.abs(allb[alla != 0]).min() >= np.abs(allb[alla == 0]).max()


def test_n_m_keeps_n_of_every_m_along_the_input_axis():
    model = compile_(keras.Sequential([keras.Input((8,)), keras.layers.Dense(6)]), sk.wrap(keras.optimizers.SGD(0.1)))
    reached = sk.prune_now(model, 0.5, pattern="2:4")
    assert reached == 0.5
    kernel = numpy(model.layers[0].kernel)  # [in=8, out=6]
    groups = (kernel != 0).reshape(2, 4, 6).sum(axis=1)
    assert (groups == 2).all()


def _linear(inputs=5, outputs=3):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(outputs)])
    model.compile(optimizer=sk.wrap(keras.optimizers.SGD(0.1)), loss="mse")
    return model


def _linear_grad(model, x, y):
    """dL/dW of mean((xW + b - y)**2), worked out by hand."""
    w, b = (numpy(v) for v in model.layers[0].weights)
    residual = x @ w + b - y
    return 2.0 * x.T @ residual / residual.size


def test_gradient_and_taylor_scores_equal_the_analytic_gradient():
    rng = np.random.default_rng(7)
    batches = [(rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")) for _ in range(3)]
    model = _linear()
    targets = sk.prunable_targets(model)
    grads = [_linear_grad(model, x, y) for x, y in batches]
    gradient = sk.CRITERIA.build("gradient").scores(model, targets, batches)[0]
    np.testing.assert_allclose(gradient, np.mean([np.abs(g) for g in grads], axis=0), rtol=1e-4, atol=1e-6)
    taylor = sk.CRITERIA.build("taylor").scores(model, targets, batches)[0]
    w = numpy(model.layers[0].kernel)
    np.testing.assert_allclose(taylor, np.abs(w * np.mean(grads, axis=0)), rtol=1e-4, atol=1e-6)


def test_activation_score_is_weight_times_mean_input():
    rng = np.random.default_rng(8)
    batches = [(rng.normal(size=(16, 5)).astype("float32") * np.arange(1, 6, dtype="float32"), None) for _ in range(2)]
    model = _linear()
    score = sk.CRITERIA.build("activation").scores(model, sk.prunable_targets(model), batches)[0]
    mean_abs = np.mean([np.abs(x).mean(axis=0) for x, _ in batches], axis=0)
    np.testing.assert_allclose(score, np.abs(numpy(model.layers[0].kernel)) * mean_abs[:, None], rtol=1e-5)


def test_random_criterion_prunes_the_asked_fraction():
    model = compile_(mlp(hidden=20), sk.wrap(keras.optimizers.SGD(0.1)))
    model.build((None, 6))
    assert abs(sk.prune_now(model, 0.3, criterion="random") - 0.3) < 0.02


def test_save_and_load_keep_masks_schedule_position_and_clip_state(tmp_path):
    x, y = data(64)

    def schedule():
        return sk.PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=24, frequency=4)

    model = compile_(mlp(hidden=16), sk.wrap(keras.optimizers.Adam(1e-2), sk.AutoClip(history=6)))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[schedule()])  # 16 steps
    model.save(tmp_path / "pruned.keras")
    loaded = keras.models.load_model(tmp_path / "pruned.keras")
    a, b = model.optimizer, loaded.optimizer
    assert int(numpy(b.prune_step)) == 16
    assert len(b.masks) == len(a.masks) == 2
    for (va, ma), (vb, mb) in zip(a.masks, b.masks, strict=True):
        assert va.name == vb.name and va.shape == vb.shape
        np.testing.assert_array_equal(numpy(ma), numpy(mb))
    for va, vb in zip(a.rule_variables(), b.rule_variables(), strict=True):
        np.testing.assert_array_equal(numpy(va), numpy(vb))
    first, second = schedule(), schedule()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[first])
    loaded.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[second])
    assert first.history == second.history and [s for s, _ in first.history] == [20, 24]  # steps 17..32
    for wa, wb in zip(values(model.weights), values(loaded.weights), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)


def test_strip_bakes_zeros_and_leaves_a_plain_keras_model(tmp_path):
    x, y = data(32)
    model, _ = _pruned_model(keras.optimizers.Adam(1e-2), sparsity=0.6)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    zeros = [(numpy(v) == 0) for v, _ in model.optimizer.masks]
    sk.strip(model)
    assert type(model.optimizer).__name__ == "Adam"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # trains as plain Keras again
    model.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert type(loaded.optimizer).__name__ == "Adam"
    assert all(z.mean() > 0.55 for z in zeros)


def test_sparse_file_round_trips_and_is_smaller(tmp_path):
    model, _ = _pruned_model(keras.optimizers.SGD(0.1), sparsity=0.9)
    path = sk.save_sparse(model, tmp_path / "sparse.safetensors")
    dense_bytes = sum(numpy(v).nbytes for v in model.weights)
    assert path.stat().st_size < 0.5 * dense_bytes + 2000
    other = compile_(mlp(seed=5, hidden=16), keras.optimizers.SGD(0.1))
    other.build((None, 6))
    sk.load_sparse(other, path)
    for a, b in zip(values(model.weights), values(other.weights), strict=True):
        np.testing.assert_array_equal(a, b)
    report = sk.sparsity_report(model)
    assert report[-1].weight == "total" and abs(report[-1].sparsity - 0.9) < 0.01


def test_sparse_weights_h5_is_smaller_and_stock_load_weights_restores_it(tmp_path):
    model = compile_(mlp(inputs=64, hidden=96, classes=10), sk.wrap(keras.optimizers.Adam(1e-2)))
    sk.prune_now(model, 0.9)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 64)).astype("float32"), rng.integers(0, 10, 16), epochs=1, verbose=0)
    sk.strip(model)
    sparse = sk.save_sparse(model, tmp_path / "sparse.weights.h5")
    other = mlp(seed=7, inputs=64, hidden=96, classes=10)  # a fresh model: no optimizer
    assert any(not np.array_equal(a, b) for a, b in zip(values(model.weights), values(other.weights), strict=True))
    other.load_weights(sparse)  # stock Keras
    for a, b in zip(values(model.weights), values(other.weights), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (values(other.weights)[0] == 0).mean() == pytest.approx(0.9, abs=0.01)
    other.save_weights(tmp_path / "dense.weights.h5")  # Keras' own file of the same weights
    dense_size = (tmp_path / "dense.weights.h5").stat().st_size
    assert sparse.stat().st_size < 0.45 * dense_size, (sparse.stat().st_size, dense_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.weights.h5", "sparse.weights.h5"]
    with pytest.raises(SecateursError) as err:
        sk.save_sparse(model, tmp_path / "weights.h5")
    assert err.value.field == "path"


def _fake_cifar10(root, per_batch=32, seed=0):
    """A tiny CIFAR-10 in its real on-disk form: ``cifar-10-batches-py/`` holding
    ``data_batch_1..5`` and ``test_batch``, pickled dicts with bytes keys whose ``b"data"`` is
    ``uint8 [N, 3072]`` (channel-major rows) and ``b"labels"`` a list, plus ``batches.meta``."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{k}.png".encode() for k in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % k for k in range(10)], b"num_vis": 3072}, f, protocol=4)
    return folder


def test_the_seed_example_runs_its_cifar10_path(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from keras.src.datasets.cifar import load_batch  # Keras' own reader of these files

    folder = _fake_cifar10(tmp_path)
    path = Path(__file__).resolve().parents[2] / "examples" / "keras_seed_cnn.py"
    spec = importlib.util.spec_from_file_location("keras_seed_cnn", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.find_cifar(str(tmp_path)) == folder
    (x, y), (xt, yt) = example.load_cifar10(folder)
    parts = [load_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    ref = np.concatenate([p[0] for p in parts]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(x, ref.astype("float32") / 255.0)
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))
    test_x, test_y = load_batch(folder / "test_batch")
    np.testing.assert_array_equal(xt * 255.0, test_x.transpose(0, 2, 3, 1))
    assert x.shape == (160, 32, 32, 3) and list(yt) == list(test_y)
    # 5 full batches of 32 (one compiled train step); prunes at steps 0 to 3, the last to 90%
    example.main(["--cifar", str(tmp_path), "--epochs", "1"])
    out = capsys.readouterr().out
    assert f"backend {BACKEND}, data CIFAR-10" in out
    total = [line for line in out.splitlines() if line.startswith("| total |")]
    assert len(total) == 1 and total[0].endswith("| 90.0% |"), out[-2000:]
    assert "test accuracy " in out


def _layer_model(kind):
    L = keras.layers
    if kind == "conv1d":
        return keras.Sequential([keras.Input((12, 4)), L.Conv1D(8, 3), L.GlobalAveragePooling1D(), L.Dense(3)])
    if kind == "conv2d":
        return keras.Sequential([keras.Input((8, 8, 4)), L.Conv2D(8, 3), L.GlobalAveragePooling2D(), L.Dense(3)])
    if kind == "depthwise":
        return keras.Sequential([keras.Input((8, 8, 4)), L.DepthwiseConv2D(3, depth_multiplier=2), L.GlobalAveragePooling2D(), L.Dense(3)])
    if kind in ("lstm", "gru", "simple_rnn"):
        rnn = {"lstm": L.LSTM, "gru": L.GRU, "simple_rnn": L.SimpleRNN}[kind]
        return keras.Sequential([keras.Input((5, 4)), rnn(8), L.Dense(3)])
    if kind == "mha":
        inp = keras.Input((5, 8))
        out = L.MultiHeadAttention(num_heads=2, key_dim=4)(inp, inp)
        return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(out)))
    if kind == "einsum":
        return keras.Sequential([keras.Input((8,)), L.EinsumDense("ab,bc->ac", output_shape=6, bias_axes="c"), L.Dense(3)])
    raise AssertionError(kind)


KINDS = {
    "conv1d": 2, "conv2d": 2, "depthwise": 2, "lstm": 3, "gru": 3, "simple_rnn": 3, "mha": 5, "einsum": 2,
}  # fmt: skip  (targets: the layer's kernels plus the Dense head)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_supported_layer_type_prunes_and_stays_pruned(kind):
    model = compile_(_layer_model(kind), sk.wrap(keras.optimizers.Adam(1e-2)))
    targets = sk.prunable_targets(model)
    assert len(targets) == KINDS[kind]
    sk.prune_now(model, 0.5)
    shape = model.inputs[0].shape[1:]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, *shape)).astype("float32")
    model.fit(x, rng.integers(0, 3, 16), batch_size=8, epochs=1, verbose=0)
    for t in targets:
        w = numpy(t.variable)
        assert abs((w == 0).mean() - 0.5) < 0.05, t.name


def test_bad_input_is_an_error_naming_the_argument():
    def field_of(make):
        with pytest.raises(SecateursError) as err:
            make()
        return err.value.field

    assert field_of(lambda: sk.PolynomialDecay(final_sparsity=1.5)) == "final_sparsity"
    assert field_of(lambda: sk.OneShot(-0.1)) == "sparsity"
    assert field_of(lambda: sk.OneShot(0.5, criterion="nope")) == "criterion"
    assert field_of(lambda: sk.OneShot(0.5, pattern="4:2")) == "pattern"
    assert field_of(lambda: sk.OneShot(0.5, scope="model")) == "scope"
    assert field_of(lambda: sk.OneShot(0.5, criterion="gradient")) == "data"
    model = compile_(
        keras.Sequential([keras.Input((6,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3)]),
        sk.wrap(keras.optimizers.SGD(0.1)),
    )
    assert field_of(lambda: sk.prune_now(model, 0.5, layers=["bn"])) == "layers[0]"
    assert field_of(lambda: sk.prune_now(model, 0.5, layers=["missing"])) == "layers[0]"
    plain = compile_(mlp(), keras.optimizers.Adam())
    x, y = data(8)
    with pytest.raises(SecateursError) as err:
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[sk.OneShot(0.5)])
    assert err.value.field == "model.optimizer" and "secateurs.keras.wrap" in str(err.value)
