"""Clipping rules: results against references, adaptive recurrences, state round trips."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from test_clip_functional import clone, random_params

from secateurs.clip import (
    AGC,
    AdaGC,
    AutoClip,
    Chain,
    ClipStats,
    GlobalNorm,
    Norm,
    Rule,
    Value,
    ZClip,
    agc_,
    wrap,
)
from secateurs.errors import SecateursError


def params_with_grads(seed: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in [(6, 4), (6,), (2, 3, 3, 3)]:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * scale
        out.append(p)
    return out


def scalar_param(value: float) -> list[torch.nn.Parameter]:
    """One parameter whose gradient norm is exactly ``abs(value)``."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([float(value)])
    return [p]


def test_global_norm_rule_equals_torch_clip_grad_norm_() -> None:
    ours, ref = params_with_grads(0), params_with_grads(0)
    stats = GlobalNorm(0.7)(ours)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.7)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(stats.norm_before, ref_norm)
    assert stats.clipped.item() is True
    assert stats.norm_after.item() == pytest.approx(0.7, rel=1e-5)
    assert stats.threshold.item() == pytest.approx(0.7)


def test_global_norm_rule_reports_not_clipped_under_threshold() -> None:
    params = params_with_grads(0)
    before = [p.grad.clone() for p in params]
    stats = GlobalNorm(1e6)(params)
    assert stats.clipped.item() is False
    assert torch.equal(stats.norm_after, stats.norm_before)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad, b)


def test_norm_rule_equals_per_tensor_torch_clipping() -> None:
    ours, ref = params_with_grads(1), params_with_grads(1)
    stats = Norm(1.0, norm_type=math.inf)(ours)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=math.inf)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert stats.clipped.item() is True


def test_value_rule_equals_torch_clip_grad_value_and_reports_after_norm() -> None:
    ours, ref = params_with_grads(2), params_with_grads(2)
    stats = Value(0.5)(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref]))
    torch.testing.assert_close(stats.norm_after, after)
    assert stats.clipped.item() is True


def test_agc_rule_equals_agc_function() -> None:
    ours, ref = params_with_grads(3, scale=0.1), params_with_grads(3, scale=0.1)
    stats = AGC(0.05)(ours)
    norm = agc_(ref, 0.05)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(stats.norm_before, norm)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref]))
    torch.testing.assert_close(stats.norm_after, after)


def fresh_grads(params: list[torch.nn.Parameter], seed: int) -> list[torch.nn.Parameter]:
    """``params`` with new random gradients, and a detached copy of both to clip by agc_."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
    return clone(params)


def test_agc_rule_reuses_its_plan_and_rebuilds_it_when_the_layout_changes() -> None:
    rule = AGC(0.05)
    params = params_with_grads(3) + params_with_grads(4)  # stacked groups and lone tensors
    rule(params)
    plan = rule._plan
    steps = [
        (params, True),  # same parameters, new gradients: the same plan
        (params_with_grads(5) + params_with_grads(6), False),  # other parameter objects
        (params, False),
    ]
    for i, (ps, reused) in enumerate(steps):
        ref = fresh_grads(ps, seed=i)
        stats = rule(ps)
        assert (rule._plan is plan) == reused
        plan = rule._plan
        assert torch.equal(stats.norm_before, agc_(ref, 0.05))
        for a, b in zip(ps, ref, strict=True):
            assert torch.equal(a.grad, b.grad)
    for p in params:  # the same objects, cast in place (as model.double() does)
        p.data = p.data.double()
    ref = fresh_grads(params, seed=9)
    stats = rule(params)
    assert rule._plan is not plan
    assert torch.equal(stats.norm_before, agc_(ref, 0.05))
    for a, b in zip(params, ref, strict=True):
        assert a.grad.dtype == torch.float64 and torch.equal(a.grad, b.grad)


def test_chain_applies_rules_in_order() -> None:
    ours, ref = params_with_grads(4), params_with_grads(4)
    stats = Chain(Value(0.5), GlobalNorm(1.0))(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert stats.threshold.item() == 1.0


def test_rule_on_params_without_grads_reports_zero_norm() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    stats = GlobalNorm(1.0)([p])
    assert stats.norm_before.item() == 0.0 and stats.clipped.item() is False


# -- AutoClip -----------------------------------------------------------------------------------


def test_autoclip_threshold_is_numpy_percentile_of_its_bounded_history() -> None:
    rng = np.random.default_rng(0)
    rule = AutoClip(percentile=25, history=12)
    seen: list[float] = []
    for step in range(40):
        params = params_with_grads(step, scale=float(rng.lognormal()))
        stats = rule(params)
        seen.append(float(stats.norm_before))
        expected = np.percentile(np.array(seen[-12:], dtype=np.float32), 25)
        assert stats.threshold.item() == pytest.approx(float(expected), rel=1e-5), step
        assert stats.norm_after.item() == pytest.approx(min(seen[-1], float(expected)), rel=1e-5)


def test_autoclip_default_percentile_is_ten() -> None:
    rule = AutoClip()
    norms = [float(v) for v in range(1, 22)]
    for v in norms:
        stats = rule(scalar_param(v))
    assert stats.threshold.item() == pytest.approx(float(np.percentile(norms, 10)))


def test_autoclip_does_not_record_non_finite_norms() -> None:
    rule = AutoClip(percentile=50)
    for v in (1.0, 2.0, math.nan, 3.0):
        stats = rule(scalar_param(v))
    assert stats.threshold.item() == pytest.approx(2.0)
    assert rule.state_dict()["count"].item() == 3


# -- ZClip --------------------------------------------------------------------------------------


def zclip_reference(
    norms: list[float], alpha: float, z_thresh: float, warmup: int, max_norm: float | None
) -> list[float]:
    """The recurrence of Kumar et al. 2025 in float64, ``max_norm`` a ceiling at every step as
    in the authors' package; returns the norm after clipping per step."""
    out, buffer = [], []
    mean = var = None
    cap = math.inf if max_norm is None else max_norm
    for g in norms:
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((x - mean) ** 2 for x in buffer) / warmup
            out.append(g * min(cap / (g + 1e-6), 1.0))  # clip_grad_norm_'s factor
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        g_star = mean + z_thresh**2 * std / z if z > z_thresh else g
        limit = min(g_star, cap)
        out.append(g * min(limit / (g + 1e-6), 1.0) if g > limit else g)
        mean = alpha * mean + (1 - alpha) * g_star
        var = alpha * var + (1 - alpha) * (g_star - mean) ** 2
    return out


@pytest.mark.parametrize("max_norm", [1.0, None], ids=["default_ceiling", "no_ceiling"])
def test_zclip_follows_its_recurrence_on_a_planted_spike_sequence(max_norm: float | None) -> None:
    rng = np.random.default_rng(1)
    norms = list(1.0 + 0.05 * rng.standard_normal(80))
    spikes = {40: 10.0, 41: 6.0, 65: 4.0}
    for i, v in spikes.items():
        norms[i] = v
    expected = zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, max_norm=max_norm)

    rule = ZClip() if max_norm == 1.0 else ZClip(max_norm=max_norm)
    clipped_at = []
    for i, v in enumerate(norms):
        stats = rule(scalar_param(v))
        assert stats.norm_after.item() == pytest.approx(expected[i], rel=1e-4), i
        if stats.clipped.item():
            clipped_at.append(i)
    assert clipped_at == [i for i, v in enumerate(norms) if expected[i] < v]
    assert set(spikes) <= set(clipped_at)


def test_zclip_does_not_clip_during_warmup_without_max_norm() -> None:
    rule = ZClip(warmup_steps=5, max_norm=None)
    for v in (1.0, 100.0, 1.0, 1.0):
        assert rule(scalar_param(v)).clipped.item() is False


def test_zclip_clips_to_max_norm_during_warmup_when_given() -> None:
    rule = ZClip(warmup_steps=5, max_norm=2.0)
    stats = rule(scalar_param(10.0))
    assert stats.norm_after.item() == pytest.approx(2.0, rel=1e-5)


def test_zclip_mean_option_clips_to_the_ema_mean() -> None:
    rule = ZClip(warmup_steps=4, clip_option="mean")
    for v in (1.0, 1.2, 0.8, 1.0):
        rule(scalar_param(v))
    stats = rule(scalar_param(50.0))
    assert stats.norm_after.item() == pytest.approx(1.0, rel=1e-4)


# -- AdaGC --------------------------------------------------------------------------------------


def adagc_reference(
    steps: list[list[float]], lambda_abs: float, lambda_rel: float, beta: float, warmup: int
) -> list[list[float]]:
    """Per-tensor recurrence of Wang et al. 2025; returns the clipped per-tensor norms."""
    gamma = [math.inf] * len(steps[0])
    out = []
    for t, norms in enumerate(steps):
        if t < warmup:
            total = math.sqrt(sum(n * n for n in norms))
            h = [min(lambda_abs / (total + 1e-6), 1.0)] * len(norms)
        else:
            h = [min(lambda_rel * gm / (n + 1e-6), 1.0) for gm, n in zip(gamma, norms, strict=True)]
        clipped = [hi * n for hi, n in zip(h, norms, strict=True)]
        if t < warmup:
            gamma = [min(gm, c) for gm, c in zip(gamma, clipped, strict=True)]
        else:
            gamma = [beta * gm + (1 - beta) * c for gm, c in zip(gamma, clipped, strict=True)]
        out.append(clipped)
    return out


def test_adagc_follows_its_per_tensor_recurrence() -> None:
    rng = np.random.default_rng(2)
    steps = [[float(a), float(b)] for a, b in rng.lognormal(size=(30, 2))]
    steps[20] = [30.0, steps[20][1]]  # a spike in the first tensor only
    expected = adagc_reference(steps, 1.0, 1.05, 0.98, warmup=10)

    rule = AdaGC(warmup_steps=10)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    for t, (na, nb) in enumerate(steps):
        a.grad, b.grad = torch.tensor([na]), torch.tensor([nb])
        rule([a, b])
        assert a.grad.item() == pytest.approx(expected[t][0], rel=1e-5), t
        assert b.grad.item() == pytest.approx(expected[t][1], rel=1e-5), t
    assert expected[20][0] < 30.0 / 5  # the spike was cut down


def test_adagc_keeps_state_of_params_without_grad() -> None:
    rule = AdaGC(warmup_steps=1)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([0.5]), torch.tensor([0.25])
    rule([a, b])
    a.grad, b.grad = torch.tensor([0.5]), None
    rule([a, b])
    gamma = rule.state_dict()["gamma"]
    assert gamma[1].item() == pytest.approx(0.25)
    assert gamma[0].item() == pytest.approx(0.5)


def test_adagc_rejects_a_changing_parameter_count() -> None:
    rule = AdaGC()
    rule(scalar_param(1.0))
    with pytest.raises(SecateursError, match="adagc"):
        rule(scalar_param(1.0) + scalar_param(2.0))


# -- state round trips --------------------------------------------------------------------------

STATEFUL = [
    lambda: AutoClip(percentile=30, history=8),
    lambda: ZClip(warmup_steps=5),
    lambda: AdaGC(warmup_steps=4),
    lambda: Chain(AdaGC(warmup_steps=3), AutoClip(history=6)),
]


@pytest.mark.parametrize("make", STATEFUL, ids=["autoclip", "zclip", "adagc", "chain"])
def test_state_dict_round_trip_gives_identical_thresholds_after_resume(
    make: Callable[[], Rule],
) -> None:
    rng = np.random.default_rng(5)
    scales = rng.lognormal(size=24)
    original = make()
    for s in scales[:12]:
        original(params_with_grads(0, float(s)))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer))
    for s in scales[12:]:
        a, b = params_with_grads(1, float(s)), params_with_grads(1, float(s))
        sa: ClipStats = original(a)
        sb: ClipStats = resumed(b)
        assert torch.equal(sa.threshold, sb.threshold)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("make", STATEFUL, ids=["autoclip", "zclip", "adagc", "chain"])
def test_a_non_finite_step_leaves_the_rule_state_unchanged(make: Callable[[], Rule]) -> None:
    rule = make()
    for step in range(7):
        rule(params_with_grads(step))
    before = rule.state_dict()
    params = params_with_grads(9)
    params[0].grad[0, 0] = math.nan
    rule(params)
    after = rule.state_dict()

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(
            same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a
        )

    assert same(before, after)


def test_state_dict_is_a_copy_not_a_view_of_the_running_state() -> None:
    rule = AutoClip(history=4)
    rule(scalar_param(1.0))
    saved = rule.state_dict()
    rule(scalar_param(5.0))
    assert saved["count"].item() == 1


def test_load_state_dict_rejects_a_history_of_another_size() -> None:
    small = AutoClip(history=4)
    small(scalar_param(1.0))
    with pytest.raises(SecateursError, match="history"):
        AutoClip(history=8).load_state_dict(small.state_dict())


def test_stateless_rule_rejects_a_non_empty_state() -> None:
    expected = r"^state_dict: got \['x'\]; allowed: \{\} \(GlobalNorm keeps no state\)$"
    with pytest.raises(SecateursError, match=expected):
        GlobalNorm(1.0).load_state_dict({"x": torch.zeros(1)})


def test_chain_names_the_entry_of_a_rule_state_it_cannot_load() -> None:
    chain = Chain(AutoClip(history=4), GlobalNorm(1.0))
    expected = r"^state_dict\['1'\]: got \['x'\]; allowed: \{\} \(GlobalNorm keeps no state\)$"
    with pytest.raises(SecateursError, match=expected) as err:
        chain.load_state_dict({"0": {}, "1": {"x": torch.zeros(1)}})
    assert err.value.field == "state_dict['1']"
    with pytest.raises(SecateursError, match=r"^state_dict: got \['0'\]; allowed: keys \['0', '1'\]$"):
        chain.load_state_dict({"0": {}})


def test_chain_arguments_are_named() -> None:
    with pytest.raises(SecateursError, match=r"^rules: got \(\); allowed: one or more rules$"):
        Chain()
    with pytest.raises(SecateursError, match=r"^rules\[1\]: got 'agc'; allowed: a secateurs.clip rule$"):
        Chain(GlobalNorm(1.0), "agc")  # type: ignore[arg-type]


def test_rules_with_published_defaults_construct_without_arguments() -> None:
    assert repr(AutoClip()) == "AutoClip(percentile=10.0, history=1000, norm_type=2.0)"
    assert ZClip().alpha == 0.97 and ZClip().z_thresh == 2.5 and ZClip().warmup_steps == 25
    assert AGC().clipping == 0.01 and AGC().eps == 1e-3
    assert AdaGC().lambda_rel == 1.05 and AdaGC().beta == 0.98


def test_state_lives_on_the_gradients_device() -> None:
    rule = ZClip()
    p = torch.nn.Parameter(torch.zeros(2, device="meta"))
    p.grad = torch.zeros(2, device="meta")
    rule([p])
    assert all(t.device.type == "meta" for t in rule.state_dict().values())


@pytest.mark.parametrize(
    "make",
    [*STATEFUL, AGC, lambda: GlobalNorm(1.0)],
    ids=["autoclip", "zclip", "adagc", "chain", "agc", "global_norm"],
)
def test_a_first_call_under_inference_mode_leaves_a_rule_usable_outside_it(
    make: Callable[[], Rule],
) -> None:
    # the state (and AGC's plan) made on the first call must not be inference tensors, or
    # every later in-place update outside inference mode raises
    rng = np.random.default_rng(2)
    scales = rng.lognormal(size=8)
    first, plain = make(), make()
    for step, s in enumerate(scales):
        a, b = params_with_grads(step, float(s)), params_with_grads(step, float(s))
        if step == 0:
            with torch.inference_mode():
                sa: ClipStats = first(a)
        else:
            sa = first(a)
        sb: ClipStats = plain(b)
        assert torch.equal(sa.threshold, sb.threshold)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.grad, y.grad)


def test_a_state_loaded_under_inference_mode_is_usable_outside_it() -> None:
    original = AutoClip(history=4)
    for step in range(3):
        original(params_with_grads(step))
    resumed = AutoClip(history=4)
    with torch.inference_mode():
        resumed.load_state_dict(original.state_dict())
    a, b = params_with_grads(7), params_with_grads(7)
    assert torch.equal(original(a).threshold, resumed(b).threshold)


@pytest.mark.parametrize(
    "make",
    [
        AGC,
        AutoClip,
        lambda: ZClip(warmup_steps=3),
        lambda: AdaGC(warmup_steps=2),
        lambda: GlobalNorm(1.0, norm_type="inf"),
        lambda: Norm(0.5, norm_type="inf"),
        lambda: Value(0.3),
    ],
    ids=["agc", "autoclip", "zclip", "adagc", "global_inf", "norm_inf", "value"],
)
def test_empty_parameters_change_nothing(make: Callable[[], Rule]) -> None:
    # a model with zero-size parameters (a layer pruned to no units, an empty shard) clips
    # its other parameters exactly as the same model without them
    with_empty, without = make(), make()
    for step in range(6):
        plain = params_with_grads(step, scale=float(2**step))
        empty = random_params([(0, 4), (0, 4), (6, 0), (0,)], seed=step, scale=1.0)
        copies = clone(plain)
        a: ClipStats = with_empty(empty[:2] + copies[:2] + empty[2:] + copies[2:])
        b: ClipStats = without(plain)
        torch.testing.assert_close(a.norm_before, b.norm_before)
        torch.testing.assert_close(a.norm_after, b.norm_after)
        assert torch.equal(a.clipped, b.clipped)
        for c, p in zip(copies, plain, strict=True):
            torch.testing.assert_close(c.grad, p.grad)


def sparse_embedding_params() -> list[torch.nn.Parameter]:
    """A dense Linear after an Embedding(sparse=True): the second parameter's grad is sparse."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Embedding(10, 4, sparse=True))
    model[1](torch.tensor([1, 3, 3])).sum().backward()
    model[0].weight.grad = torch.ones(4, 4)
    model[0].bias.grad = torch.ones(4)
    return [model[0].weight, model[1].weight, model[0].bias]


def densified(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Copies of ``params`` whose gradients are the same numbers, stored dense."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params, strict=True):
        c.grad = p.grad.to_dense().clone()
    return copies


def torch_clips_sparse_gradients() -> bool:
    """Whether this torch's own ``clip_grad_norm_`` takes a sparse gradient (2.14 does, 2.13 not)."""
    try:
        torch.nn.utils.clip_grad_norm_(sparse_embedding_params(), 1.0)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize(
    "make",
    [AGC, AutoClip, ZClip, AdaGC, lambda: GlobalNorm(1.0), lambda: Norm(1.0), lambda: Value(1.0)],
    ids=["agc", "autoclip", "zclip", "adagc", "global_norm", "norm", "value"],
)
def test_a_sparse_gradient_is_clipped_as_its_dense_equal_or_is_a_clear_error(make: Callable[[], Rule]) -> None:
    params = sparse_embedding_params()
    assert params[1].grad.layout == torch.sparse_coo
    dense = densified(params)
    try:
        make()(params)
    except SecateursError as e:
        assert re.search(r"params\[1\]\.grad: got a torch\.sparse_coo", str(e)), e
        return
    make()(dense)
    for p, d in zip(params, dense, strict=True):
        torch.testing.assert_close(p.grad.to_dense(), d.grad)


def test_global_norm_takes_sparse_gradients_exactly_when_torch_does() -> None:
    params, reference = sparse_embedding_params(), sparse_embedding_params()
    if not torch_clips_sparse_gradients():
        with pytest.raises(SecateursError, match=r"params\[1\]\.grad: got a torch\.sparse_coo"):
            GlobalNorm(1.0)(params)
        return
    norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(GlobalNorm(1.0)(params).norm_before, norm)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad.to_dense(), r.grad.to_dense())


def test_a_sparse_gradient_in_a_wrapped_step_is_clipped_as_torch_does_or_is_a_clear_error() -> None:
    params, reference = sparse_embedding_params(), sparse_embedding_params()
    optimizer = wrap(torch.optim.SGD(params, lr=0.1), GlobalNorm(1.0))
    if not torch_clips_sparse_gradients():
        with pytest.raises(SecateursError, match=r"params\[1\]\.grad: .*sparse"):
            optimizer.step()
        return
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.optim.SGD(reference, lr=0.1).step()
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach(), r.detach())


def test_other_failures_of_a_rule_pass_unchanged() -> None:
    class Broken(GlobalNorm):
        def clip(self, params: list[torch.Tensor]) -> ClipStats:
            raise RuntimeError("not about sparsity")

    with pytest.raises(RuntimeError, match="not about sparsity"):  # all gradients dense
        Broken(1.0)(params_with_grads(0))
