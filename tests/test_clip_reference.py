"""Differential tests: each adaptive rule beside its authors' implementation, step by step.

The same recorded gradients go to a secateurs rule and to the reference: a warm-up, steady
training, isolated spikes in one tensor, a steady exponential growth past ZClip's ceiling, one
step with a NaN, then steady training with one more spike. Thresholds, clip factors and the
clipped gradients must agree to float32 rounding on every step; where a rule differs from its
reference on purpose (the rule's docstring and the README list each difference), the test
asserts the difference itself.

References: ``zclip`` 1.0.0 (``ZClip``), ``autoclip`` 0.2.1 (``QuantileClip``) and the
AutoClip authors' ``autoclip.py`` (transcribed below), timm's ``adaptive_clip_grad`` (loaded
from the installed timm, whose package import needs torchvision; skipped without timm, the
row loop of ``test_clip_functional`` stands in), and the AdaGC authors' ``AdaGC.clip_by_norm``
(transcribed below: it lives in a Megatron patch, not in a package).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_rules import AuthorsAdaGC
from test_clip_functional import reference_agc

from secateurs.clip import AGC, AdaGC, AutoClip, ZClip

SHAPES = [(8, 5), (8,), (4, 2, 3, 3), ()]
RELATIVE = [1.0, 0.4, 1.5, 0.2]  # each tensor's share of the total norm
STEPS = 130
NAN_STEP = 100
LATE = 30  # the 0-d parameter has no gradient before this step (AdaGC meets it after warm-up)


@dataclass(frozen=True)
class Step:
    weights: list[torch.Tensor]
    grads: list[torch.Tensor | None]


def schedule() -> list[list[float]]:
    """Per-tensor gradient norms: warm-up and steady noise, spikes in tensor 0 at 45 and 60,
    growth by 7% a step from 70 to 99, then steady again with a spike in tensor 2 at 110."""
    rng = np.random.default_rng(0)
    share = np.array(RELATIVE) / np.linalg.norm(RELATIVE)
    out = []
    for t in range(STEPS):
        base = 0.95 * (1 + 0.1 * rng.standard_normal())
        if 70 <= t < NAN_STEP:
            base *= 1.07 ** (t - 69)
        norms = base * share
        if t in (45, 60):
            norms[0] *= 8.0 if t == 45 else 4.0
        if t == 110:
            norms[2] *= 8.0
        out.append([float(n) for n in norms])
    return out


def recorded_steps() -> list[Step]:
    g = torch.Generator().manual_seed(0)
    steps = []
    for t, norms in enumerate(schedule()):
        weights = [torch.randn(s, generator=g) for s in SHAPES]
        weights[0][3] = 0.0  # a unit whose weight norm is below AGC's eps
        grads: list[torch.Tensor | None] = []
        for s, n in zip(SHAPES, norms, strict=True):
            d = torch.randn(s, generator=g)
            grads.append(d * (n / d.norm()))
        if t < LATE:
            grads[3] = None
        if t == NAN_STEP:
            grads[2][1, 0, 0, 0] = math.nan  # type: ignore[index]
        steps.append(Step(weights, grads))
    return steps


STEPS_RECORDED = recorded_steps()
FINITE = [s for t, s in enumerate(STEPS_RECORDED) if t != NAN_STEP]


class Params:
    """One implementation's parameters: persistent objects (the package clippers hold them),
    refilled with each recorded step."""

    def __init__(self) -> None:
        self.list = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        self.module = torch.nn.ParameterList(self.list)

    def load(self, step: Step) -> list[torch.nn.Parameter]:
        for p, w, g in zip(self.list, step.weights, step.grads, strict=True):
            p.data.copy_(w)
            p.grad = None if g is None else g.clone()
        return self.list

    def grads(self) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.list]


def assert_grads_close(
    a: list[torch.Tensor | None], b: list[torch.Tensor | None], at: object
) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None), at
        if x is not None:
            torch.testing.assert_close(
                x, y, rtol=2e-5, atol=1e-8, equal_nan=True, msg=lambda m: f"{at}: {m}"
            )


def total(grads: list[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


def run_rule(
    rule: Callable[[list[torch.nn.Parameter]], object], steps: list[Step]
) -> tuple[list, list]:
    params, grads, stats = Params(), [], []
    for step in steps:
        stats.append(rule(params.load(step)))
        grads.append(params.grads())
    return grads, stats


# -- ZClip against zclip 1.0.0 -----------------------------------------------------------------

ZCLIP_SETTINGS = [
    {},
    {"clip_option": "mean"},
    {"max_norm": None},
    {"max_norm": 2.0, "z_thresh": 2.0, "alpha": 0.9, "warmup_steps": 10},
]


def zclip_reference(settings: dict, steps: list[Step]) -> tuple[list, list]:
    """Gradients after zclip.ZClip.step, and its (mean, var) after each step (None in warm-up)."""
    zclip = pytest.importorskip("zclip")
    kwargs = {"max_grad_norm" if k == "max_norm" else k: v for k, v in settings.items()}
    ref = zclip.ZClip(**kwargs)
    params, grads, moments = Params(), [], []
    for step in steps:
        params.load(step)
        ref.step(params.module)
        grads.append(params.grads())
        moments.append((ref.mean, ref.var) if ref.initialized else None)
    return grads, moments


@pytest.mark.parametrize(
    "settings", ZCLIP_SETTINGS, ids=["defaults", "mean", "no_ceiling", "other"]
)
def test_zclip_equals_the_authors_package_on_every_finite_step(settings: dict) -> None:
    rule = ZClip(**settings, cuda_graph=False)
    params = Params()
    ceiling = settings.get("max_norm", 1.0)
    z_thresh, eps = settings.get("z_thresh", 2.5), 1e-6
    ref_grads, moments = zclip_reference(settings, STEPS_RECORDED[:NAN_STEP])
    for t, step in enumerate(STEPS_RECORDED[:NAN_STEP]):
        stats = rule(params.load(step))
        ours = params.grads()
        assert_grads_close(ours, ref_grads[t], t)
        # the threshold reported is the z-test's trigger from the statistics before the step
        before = moments[t - 1] if t else None
        if before is None:
            expected = math.inf if ceiling is None else ceiling
        else:
            expected = before[0] + z_thresh * (math.sqrt(before[1]) + eps)
            expected = expected if ceiling is None else min(expected, ceiling)
        assert stats.threshold.item() == pytest.approx(expected, rel=1e-5), t
        if moments[t] is not None:
            state = rule.state_dict()
            assert state["mean"].item() == pytest.approx(moments[t][0], rel=1e-5), t
            assert state["var"].item() == pytest.approx(moments[t][1], rel=1e-4, abs=1e-12), t
    assert rule.state_dict()["seen"].item() == rule.warmup_steps


def test_zclip_default_ceiling_bounds_every_step_warm_up_included() -> None:
    assert ZClip().max_norm == 1.0
    _, capped = run_rule(ZClip(), STEPS_RECORDED[:NAN_STEP])
    _, free = run_rule(ZClip(max_norm=None), STEPS_RECORDED[:NAN_STEP])
    after = [s.norm_after.item() for s in capped]
    assert max(after) <= 1.0 + 1e-6
    over = [t for t, s in enumerate(free) if s.norm_after.item() > 1.0]
    assert any(t < 25 for t in over) and any(t >= 25 for t in over)  # in warm-up and after
    assert all(after[t] == pytest.approx(1.0, rel=1e-5) for t in over)


@pytest.mark.parametrize("settings", ZCLIP_SETTINGS[:3], ids=["defaults", "mean", "no_ceiling"])
def test_zclip_skips_a_non_finite_step_where_the_package_poisons_its_statistics(
    settings: dict,
) -> None:
    zclip = pytest.importorskip("zclip")
    rule = ZClip(**settings, cuda_graph=False)
    ours, _ = run_rule(rule, STEPS_RECORDED)
    poisoned, moments = zclip_reference(settings, STEPS_RECORDED)
    skipping, _ = zclip_reference(settings, FINITE)  # the package, never shown the NaN step

    # the NaN step: ours multiplies by a NaN factor (as clip_grad_norm_ does) for wrap to skip;
    # the package leaves the gradients unscaled
    assert all(torch.isnan(g).all() for g in ours[NAN_STEP] if g is not None)
    assert_grads_close(
        poisoned[NAN_STEP], STEPS_RECORDED[NAN_STEP].grads, "package at the NaN step"
    )
    # afterwards ours is the package that never saw that step ...
    for t in range(NAN_STEP + 1, STEPS):
        assert_grads_close(ours[t], skipping[t - 1], t)
    # ... while the package's mean is NaN for good: it only clips to max_grad_norm from then on
    assert all(math.isnan(m[0]) for m in moments[NAN_STEP:])
    plain = zclip.ZClip(max_grad_norm=settings.get("max_norm", 1.0), warmup_steps=1)
    plain.initialized, plain.mean, plain.var = True, math.nan, math.nan
    for t in range(NAN_STEP + 1, STEPS):
        params = Params()
        params.load(STEPS_RECORDED[t])
        plain.step(params.module)
        assert_grads_close(poisoned[t], params.grads(), t)


def test_zclip_a_non_finite_norm_in_warm_up_does_not_count_as_a_warm_up_step() -> None:
    zclip = pytest.importorskip("zclip")
    rule, ref = ZClip(warmup_steps=5), zclip.ZClip(warmup_steps=5)
    params, ref_params = Params(), Params()
    for t in (0, 1, NAN_STEP, 2, 3):  # the NaN step as the third of five
        rule(params.load(STEPS_RECORDED[t]))
        ref_params.load(STEPS_RECORDED[t])
        ref.step(ref_params.module)
    assert rule.state_dict()["seen"].item() == 4 and ref.initialized and math.isnan(ref.mean)


# -- AutoClip against the authors' code and autoclip 0.2.1 ---------------------------------------


class AuthorsAutoClip:
    """The AutoClip authors' handler (``autoclip.py`` of github.com/pseeth/autoclip, commit
    7de6a2f): append the total norm (a Python float), clip to ``np.percentile`` of the list.
    ``history`` bounds the list as this rule's ring buffer does (the original keeps all)."""

    def __init__(self, percentile: float, history: int) -> None:
        self.percentile = percentile
        self.history: deque[float] = deque(maxlen=history)
        self.thresholds: list[float] = []

    def __call__(self, params: list[torch.nn.Parameter]) -> None:
        norm = math.sqrt(sum(p.grad.norm().item() ** 2 for p in params if p.grad is not None))
        self.history.append(norm)
        self.thresholds.append(float(np.percentile(list(self.history), self.percentile)))
        torch.nn.utils.clip_grad_norm_(params, self.thresholds[-1])


@pytest.mark.parametrize(
    "percentile, history", [(10.0, 1000), (50.0, 16)], ids=["defaults", "short_history"]
)
def test_autoclip_equals_the_authors_code_on_every_finite_step(
    percentile: float, history: int
) -> None:
    rule = AutoClip(percentile=percentile, history=history, cuda_graph=False)
    ours, stats = run_rule(rule, STEPS_RECORDED[:NAN_STEP])
    authors = AuthorsAutoClip(percentile, history)
    ref, _ = run_rule(authors, STEPS_RECORDED[:NAN_STEP])
    for t in range(NAN_STEP):
        assert stats[t].threshold.item() == pytest.approx(authors.thresholds[t], rel=1e-5), t
        assert_grads_close(ours[t], ref[t], t)


def test_autoclip_skips_a_non_finite_step_the_authors_code_would_record() -> None:
    rule = AutoClip(cuda_graph=False)
    ours, stats = run_rule(rule, STEPS_RECORDED)
    authors = AuthorsAutoClip(10.0, 1000)
    skipping, _ = run_rule(authors, FINITE)
    assert all(torch.isnan(g).all() for g in ours[NAN_STEP] if g is not None)
    assert rule.state_dict()["count"].item() == STEPS - 1
    for t in range(NAN_STEP + 1, STEPS):
        assert stats[t].threshold.item() == pytest.approx(authors.thresholds[t - 1], rel=1e-5), t
        assert_grads_close(ours[t], skipping[t - 1], t)


def autoclip_package(percentile: float, history: int, steps: list[Step]) -> tuple[list, list]:
    """Gradients after autoclip's global QuantileClip, and the threshold it used each step."""
    autoclip_torch = pytest.importorskip("autoclip.torch")
    params = Params()
    clipper = autoclip_torch.QuantileClip(
        params.list, quantile=percentile / 100, history_length=history, global_threshold=True
    )
    grads, used = [], []
    for step in steps:
        params.load(step)
        past = clipper.state["global_history"]
        used.append(math.inf if len(past) == 0 else torch.quantile(past, percentile / 100).item())
        clipper.step()
        grads.append(params.grads())
    return grads, used


@pytest.mark.parametrize(
    "percentile, history", [(10.0, 1000), (50.0, 16)], ids=["defaults", "short_history"]
)
def test_autoclip_package_lags_the_rule_by_one_step(percentile: float, history: int) -> None:
    # the package takes the quantile of the norms before the current one: its threshold at step
    # t + 1 is the rule's at step t, and its first step is not clipped
    _, stats = run_rule(AutoClip(percentile=percentile, history=history), STEPS_RECORDED[:NAN_STEP])
    grads, used = autoclip_package(percentile, history, STEPS_RECORDED[:NAN_STEP])
    assert used[0] == math.inf
    assert_grads_close(grads[0], STEPS_RECORDED[0].grads, 0)
    for t in range(1, NAN_STEP):
        assert used[t] == pytest.approx(stats[t - 1].threshold.item(), rel=1e-5), t
        factor = min(used[t] / (total(STEPS_RECORDED[t].grads) + 1e-6), 1.0)
        expected = [None if g is None else g * factor for g in STEPS_RECORDED[t].grads]
        assert_grads_close(grads[t], expected, t)


def test_autoclip_package_turns_every_gradient_nan_after_a_nan_norm() -> None:
    ours, _ = run_rule(AutoClip(), STEPS_RECORDED)
    grads, used = autoclip_package(10.0, 1000, STEPS_RECORDED)
    for t in range(NAN_STEP + 1, STEPS):
        assert math.isnan(used[t]), t
        assert all(torch.isnan(g).all() for g in grads[t] if g is not None), t
        assert all(torch.isfinite(g).all() for g in ours[t] if g is not None), t


# -- AGC against timm's adaptive_clip_grad ---------------------------------------------------


def timm_adaptive_clip_grad() -> Callable[..., None]:
    """``timm.utils.agc.adaptive_clip_grad`` loaded from its file: ``import timm`` imports
    torchvision, whose wheels on the package index need a CUDA build of torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    module_spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


@pytest.mark.parametrize("clipping", [0.01, 0.3])
def test_agc_equals_timm_on_every_step_the_nan_step_included(clipping: float) -> None:
    timm_agc = timm_adaptive_clip_grad()
    ours, _ = run_rule(AGC(clipping, eps=1e-3, fused=False), STEPS_RECORDED)
    ref, _ = run_rule(lambda ps: timm_agc(ps, clip_factor=clipping, eps=1e-3), STEPS_RECORDED)
    for t in range(STEPS):
        assert_grads_close(ours[t], ref[t], t)
    # a NaN makes its whole unit NaN, in both; the other units of the tensor are clipped as usual
    unit = ours[NAN_STEP][2]
    assert unit is not None and torch.isnan(unit[1]).all() and torch.isfinite(unit[[0, 2, 3]]).all()


@pytest.mark.parametrize("clipping", [0.01, 0.3])
def test_agc_equals_a_row_loop_on_every_finite_step(clipping: float) -> None:
    # where timm is missing (CI: its torchvision needs a CUDA torch), the row loop of
    # test_clip_functional is the reference (it leaves a unit holding a NaN unclipped)
    def row_loop(params: list[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                p.grad = reference_agc(p.detach(), p.grad, clipping, 1e-3)

    ours, _ = run_rule(AGC(clipping, eps=1e-3, fused=False), FINITE)
    ref, _ = run_rule(row_loop, FINITE)
    for t in range(len(FINITE)):
        assert_grads_close(ours[t], ref[t], t)


def test_agc_defaults_are_timms() -> None:
    timm_agc = timm_adaptive_clip_grad()
    defaults = inspect.signature(timm_agc).parameters
    assert (
        AGC().clipping == defaults["clip_factor"].default and AGC().eps == defaults["eps"].default
    )


# -- AdaGC against the authors' code ---------------------------------------------------------


ADAGC_SETTINGS = [(1.05, 0.98), (1.04, 0.99)]  # the paper's defaults; the authors' scripts'


def run_adagc_pair(
    lambda_rel: float, beta: float, steps: list[Step]
) -> tuple[AdaGC, AuthorsAdaGC, list, list]:
    rule = AdaGC(lambda_rel=lambda_rel, beta=beta, warmup_steps=20)
    authors = AuthorsAdaGC(lambda_rel, beta, start_clip_steps=20, max_norm=1.0)
    ours, _ = run_rule(rule, steps)
    ref, _ = run_rule(authors, steps)
    return rule, authors, ours, ref


@pytest.mark.parametrize("lambda_rel, beta", ADAGC_SETTINGS, ids=["paper", "authors_scripts"])
def test_adagc_equals_the_authors_code_on_every_finite_step(lambda_rel: float, beta: float) -> None:
    rule, authors, ours, ref = run_adagc_pair(lambda_rel, beta, STEPS_RECORDED[:NAN_STEP])
    for t in range(NAN_STEP):
        assert_grads_close(ours[t], ref[t], t)
    gamma = rule.state_dict()["gamma"]
    expected = torch.stack([authors.state[i] for i in range(len(SHAPES))])
    torch.testing.assert_close(gamma, expected, rtol=1e-5, atol=0)
    # the spikes in tensor 0 were cut to about its usual size
    for t in (45, 60):
        assert ours[t][0].norm() < 0.3 * STEPS_RECORDED[t].grads[0].norm()  # type: ignore[union-attr]


def test_adagc_a_tensor_first_seen_after_warm_up_starts_from_its_own_norm() -> None:
    rule, authors, _, _ = run_adagc_pair(1.05, 0.98, STEPS_RECORDED[: LATE + 1])
    first = STEPS_RECORDED[LATE].grads[3]
    assert first is not None
    assert rule.state_dict()["gamma"][3].item() == pytest.approx(first.norm().item(), rel=1e-6)
    assert authors.state[3].item() == pytest.approx(first.norm().item(), rel=1e-6)


@pytest.mark.parametrize("lambda_rel, beta", ADAGC_SETTINGS, ids=["paper", "authors_scripts"])
def test_adagc_skips_a_non_finite_step_where_the_authors_code_stops_clipping_that_tensor(
    lambda_rel: float, beta: float
) -> None:
    rule, authors, ours, poisoned = run_adagc_pair(lambda_rel, beta, STEPS_RECORDED)
    _, skipping_authors, _, skipping = run_adagc_pair(lambda_rel, beta, FINITE)
    for t in range(NAN_STEP + 1, STEPS):
        assert_grads_close(ours[t], skipping[t - 1], t)
    gamma = rule.state_dict()["gamma"]
    torch.testing.assert_close(
        gamma, torch.stack([skipping_authors.state[i] for i in range(4)]), rtol=1e-5, atol=0
    )
    # the authors' EMA of tensor 2 is NaN from the NaN step on, so its later spike passes whole
    assert math.isnan(authors.state[2].item())
    spike = STEPS_RECORDED[110].grads[2]
    assert spike is not None
    torch.testing.assert_close(poisoned[110][2], spike)
    assert ours[110][2].norm() < 0.3 * spike.norm()


def test_zclip_docstring_example_runs() -> None:
    import doctest

    from secateurs.clip import zclip

    result = doctest.testmod(zclip, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
