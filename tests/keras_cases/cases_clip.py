"""Keras clipping rules against Keras' own clipping, torch's clip_grad_norm_ and the PyTorch rules."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import torch
from keras import ops

import secateurs.clip as tclip
import secateurs.keras as sk
from tests.keras_cases.support import compile_, data, grads_like, mlp, numpy, tensors, values

BACKEND = keras.backend.backend()


SHAPES = [(6, 5), (5,), (5, 3), (3,)]
"""The shapes of ``support.mlp()``'s variables, used by every eager case: JAX compiles each
eager op once per shape, so one set of shapes is compiled once for the whole file."""


def _restore(variables, saved):
    for v, w in zip(variables, saved, strict=True):
        v.assign(w)


@pytest.mark.parametrize(
    ("keras_kw", "rule"),
    [
        ({"global_clipnorm": 1.0}, sk.GlobalNorm(1.0)),
        ({"clipnorm": 0.5}, sk.Norm(0.5)),
        ({"clipvalue": 0.1}, sk.Value(0.1)),
    ],
    ids=["global_clipnorm", "clipnorm", "clipvalue"],
)
def test_rule_equals_keras_own_clipping(keras_kw, rule):
    model = mlp()
    variables = model.trainable_variables
    start = values(variables)
    grads = grads_like(variables, seed=1, scale=3.0)
    keras.optimizers.SGD(0.1, **keras_kw).apply(tensors(grads), variables)
    theirs = values(variables)
    _restore(variables, start)
    sk.wrap(keras.optimizers.SGD(0.1), rule).apply(tensors(grads), variables)
    for a, b, w in zip(theirs, values(variables), start, strict=True):
        assert not np.allclose(a, w)  # the step moved the weights
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_global_norm_equals_torch_clip_grad_norm(p):
    shapes = SHAPES
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    grads = grads_like(variables, seed=2, scale=2.0)
    out, stats = sk.GlobalNorm(1.5, norm_type=p).clip([ops.convert_to_tensor(g) for g in grads], variables)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for t, g in zip(params, grads, strict=True):
        t.grad = torch.tensor(g)
    total = torch.nn.utils.clip_grad_norm_(params, 1.5, norm_type=p)
    np.testing.assert_allclose(numpy(stats.norm_before), total.item(), rtol=1e-5)
    for ours, t in zip(out, params, strict=True):
        np.testing.assert_allclose(numpy(ours), t.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert numpy(stats.clipped) == 1.0


def _torch_layout(a: np.ndarray) -> np.ndarray:
    """A Keras kernel (output axis last) in torch's layout (output axis first)."""
    if a.ndim == 2:
        return a.T
    if a.ndim == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
        return a.transpose(3, 2, 0, 1)
    return a


def test_agc_equals_pytorch_agc_on_the_same_units():
    rng = np.random.default_rng(3)
    shapes = [(3, 3, 2, 4), (4,), (8, 5), (5,)]
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    weights[1][:] = 0.0  # a zero bias: its bound is clipping * eps
    grads = [rng.normal(size=s).astype("float32") * 0.05 for s in shapes]
    variables = [keras.Variable(w) for w in weights]
    out, stats = sk.AGC(0.02).clip([ops.convert_to_tensor(g) for g in grads], variables)
    params = [torch.nn.Parameter(torch.tensor(_torch_layout(w).copy())) for w in weights]
    for t, g in zip(params, grads, strict=True):
        t.grad = torch.tensor(_torch_layout(g).copy())
    ref = tclip.AGC(0.02, fused=False)(params)
    for ours, t in zip(out, params, strict=True):
        np.testing.assert_allclose(_torch_layout(numpy(ours)), t.grad.numpy(), rtol=1e-5, atol=1e-8)
    for name in ("norm_before", "norm_after", "threshold"):
        np.testing.assert_allclose(numpy(getattr(stats, name)), getattr(ref, name).item(), rtol=1e-5)
    assert numpy(stats.clipped) == float(ref.clipped.item()) == 1.0


def _norm_sequence(steps: int = 40, nan_at: int = 30):
    """Gradient lists whose norms wander, spike now and then, and are NaN once."""
    rng = np.random.default_rng(4)
    shapes = SHAPES
    seq = []
    for t in range(steps):
        scale = 1.0 + 0.3 * np.sin(t) + (8.0 if t % 9 == 7 else 0.0)
        grads = [(rng.normal(size=s) * scale).astype("float32") for s in shapes]
        if t == nan_at:
            grads[0][0, 0] = np.nan
        seq.append(grads)
    return shapes, seq


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: sk.AutoClip(percentile=25, history=8), lambda: tclip.AutoClip(percentile=25, history=8)),
        (lambda: sk.ZClip(warmup_steps=5, max_norm=None), lambda: tclip.ZClip(warmup_steps=5, max_norm=None)),
        (lambda: sk.ZClip(warmup_steps=4, clip_option="mean"), lambda: tclip.ZClip(warmup_steps=4, clip_option="mean")),
        (lambda: sk.AdaGC(warmup_steps=5, lambda_abs=20.0, beta=0.9), lambda: tclip.AdaGC(warmup_steps=5, lambda_abs=20.0, beta=0.9)),
        (
            lambda: sk.Chain(sk.AutoClip(percentile=25, history=8), sk.GlobalNorm(2.0)),
            lambda: tclip.Chain(tclip.AutoClip(percentile=25, history=8), tclip.GlobalNorm(2.0)),
        ),
        (
            lambda: sk.Chain(sk.Value(1.5), sk.ZClip(warmup_steps=5, max_norm=None), sk.Norm(3.0)),
            lambda: tclip.Chain(tclip.Value(1.5), tclip.ZClip(warmup_steps=5, max_norm=None), tclip.Norm(3.0)),
        ),
    ],
    ids=["autoclip", "zclip", "zclip-mean", "adagc", "chain-autoclip-global_norm", "chain-value-zclip-norm"],
)
def test_adaptive_rule_follows_the_pytorch_recurrence(ours, theirs):
    shapes, seq = _norm_sequence()
    rule, ref = ours(), theirs()
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    sk.wrap(keras.optimizers.SGD(0.0), rule).build(variables)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    clipped_steps = 0
    for grads in seq:
        out, stats = rule.clip([ops.convert_to_tensor(g) for g in grads], variables)
        for t, g in zip(params, grads, strict=True):
            t.grad = torch.tensor(g)
        expected = ref(params)
        for a, t in zip(out, params, strict=True):
            np.testing.assert_allclose(numpy(a), t.grad.numpy(), rtol=2e-5, atol=1e-6, equal_nan=True)
        for name in ("norm_before", "norm_after", "threshold"):
            got, want = numpy(getattr(stats, name)), getattr(expected, name).item()
            np.testing.assert_allclose(got, want, rtol=2e-5, equal_nan=True)
        clipped_steps += int(numpy(stats.clipped))
        assert numpy(stats.clipped) == float(expected.clipped.item())
    assert 0 < clipped_steps < len(seq)  # the sequence exercised both branches
    state = list(_leaves(ref.state_dict()))
    assert len(state) >= len(rule.state_variables()) > 0
    for v, t in zip(rule.state_variables(), state, strict=False):
        np.testing.assert_allclose(numpy(v), t.numpy(), rtol=2e-5)


def _leaves(state):
    """The tensors of a (Chain's nested) torch rule state dict, in order."""
    for value in state.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def _fit(model, x, y, **kw):
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, **kw)
    return values(model.trainable_variables)


def test_compiled_fit_clips_like_keras_global_clipnorm():
    x, y = data(32)
    theirs = _fit(compile_(mlp(), keras.optimizers.SGD(0.5, global_clipnorm=0.05)), x, y)
    model = compile_(mlp(), sk.wrap(keras.optimizers.SGD(0.5), sk.GlobalNorm(0.05)))
    logger = sk.ClipStatsLogger()
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    ours = values(model.trainable_variables)
    unclipped = _fit(compile_(mlp(), keras.optimizers.SGD(0.5)), x, y)
    if BACKEND == "jax":
        assert model.jit_compile is True  # the jitted fit, not the eager one
    for a, b, c in zip(ours, theirs, unclipped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert np.abs(a - c).max() > 1e-3  # clipping changed the run
    logs = history.history
    assert logs["clip_steps"][-1] == 4.0 and logs["clip_clipped"][-1] == 1.0
    np.testing.assert_allclose(logs["clip_norm_after"][-1], 0.05, rtol=1e-4)
    assert logs["clip_norm_before"][-1] > 0.05 and logs["clip_skipped"][-1] == 0.0


def _bits(arrays):
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "eager"])
def test_nan_batch_with_skip_leaves_weights_and_optimizer_bit_identical(jit):
    x, y = data(16)
    opt = sk.wrap(keras.optimizers.AdamW(1e-2, weight_decay=0.1), sk.AutoClip(history=4), nonfinite="skip")
    model = compile_(mlp(), opt, run_eagerly=not jit)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # moments and history are non-zero
    weights = values(model.weights)
    inner = values(opt.inner_optimizer.variables)
    rule = values(opt.rule_variables())
    bad = x.copy()
    bad[3, 2] = np.nan
    model.fit(bad, y, batch_size=16, epochs=1, verbose=0)
    assert _bits(values(model.weights)) == _bits(weights)
    assert _bits(values(opt.inner_optimizer.variables)) == _bits(inner)
    assert _bits(values(opt.rule_variables())) == _bits(rule)
    assert opt.stats()["skipped"] == 1.0 and opt.stats()["steps"] == 3.0
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert _bits(values(model.weights)) != _bits(weights)  # a finite batch steps again


def test_nonfinite_error_raises_before_the_step():
    model = mlp()
    variables = model.trainable_variables
    start = values(variables)
    grads = grads_like(variables, seed=5)
    grads[0][0, 0] = np.inf
    opt = sk.wrap(keras.optimizers.SGD(0.1), sk.GlobalNorm(1.0), nonfinite="error")
    with pytest.raises(sk.NonFiniteGradError, match="nonfinite='error'"):
        opt.apply(tensors(grads), variables)
    assert _bits(values(variables)) == _bits(start)


def test_nonfinite_error_stops_a_compiled_fit():
    x, y = data(8)
    x[0, 0] = np.nan
    model = compile_(mlp(), sk.wrap(keras.optimizers.SGD(0.1), sk.GlobalNorm(1.0), nonfinite="error"))
    with pytest.raises(Exception, match="non-finite gradient norm"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_nonfinite_apply_steps_like_plain_keras():
    model = mlp()
    variables = model.trainable_variables
    grads = grads_like(variables, seed=6)
    grads[0][0, 0] = np.nan
    sk.wrap(keras.optimizers.SGD(0.1), sk.GlobalNorm(1.0), nonfinite="apply").apply(tensors(grads), variables)
    assert all(np.isnan(v).all() for v in values(variables))  # NaN factor: every weight is NaN


def test_save_and_load_keep_the_rule_state_and_continue_identically(tmp_path):
    x, y = data(32)
    rule = sk.Chain(sk.AGC(0.05), sk.ZClip(warmup_steps=3))
    model = compile_(mlp(), sk.wrap(keras.optimizers.Adam(1e-2), rule))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    opt = loaded.optimizer
    assert isinstance(opt, sk.ClippedOptimizer) and isinstance(opt.rule, sk.Chain)
    assert [type(r) for r in opt.rule.rules] == [sk.AGC, sk.ZClip]
    assert opt.rule.get_config() == rule.get_config() and opt.nonfinite == "skip"
    for a, b in zip(values(opt.variables), values(model.optimizer.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert numpy(opt.rule_variables()[1]) == 3  # warm-up complete: the EMA was saved
    _fit(model, x, y)
    _fit(loaded, x, y)
    for a, b in zip(values(model.weights), values(loaded.weights), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: sk.wrap(keras.optimizers.SGD(), "nope"), "rule"),
        (lambda: sk.wrap("adam", sk.GlobalNorm(1.0)), "optimizer"),
        (lambda: sk.wrap(keras.optimizers.SGD(global_clipnorm=1.0), sk.GlobalNorm(1.0)), "optimizer"),
        (lambda: sk.wrap(keras.optimizers.SGD(gradient_accumulation_steps=2), None), "optimizer"),
        (lambda: sk.wrap(keras.optimizers.SGD(), sk.GlobalNorm(1.0), nonfinite="ignore"), "nonfinite"),
        (lambda: sk.GlobalNorm(-1.0), "max_norm"),
        (lambda: sk.GlobalNorm(1.0, norm_type=0.5), "norm_type"),
        (lambda: sk.AutoClip(percentile=0), "percentile"),
        (lambda: sk.ZClip(alpha=1.0), "alpha"),
        (lambda: sk.ZClip(clip_option="max"), "clip_option"),
        (lambda: sk.AdaGC(warmup_steps=0), "warmup_steps"),
        (lambda: sk.AGC(clipping=0), "clipping"),
        (lambda: sk.Chain(), "rules"),
        (lambda: sk.Chain(sk.GlobalNorm(1.0), "agc"), "rules[1]"),
    ],
)
def test_bad_input_is_an_error_naming_the_argument(make, field):
    from secateurs.errors import SecateursError

    with pytest.raises(SecateursError) as err:
        make()
    assert err.value.field == field and str(err.value).startswith(field + ": got ")


def test_a_rule_name_builds_the_registered_rule_with_its_defaults():
    opt = sk.wrap(keras.optimizers.SGD(), "autoclip")
    assert isinstance(opt.rule, sk.AutoClip) and opt.rule.percentile == 10.0
    assert set(sk.RULES) >= {"global_norm", "norm", "value", "agc", "autoclip", "zclip", "adagc"}
    assert set(sk.RULES) <= set(tclip.RULES) | {"global_norm"}
