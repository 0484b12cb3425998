"""wrap(): the clipped optimizer against hand-written PyTorch loops, NaN policies, GradScaler."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch

from secateurs.clip import (
    AutoClip,
    ClipLog,
    ClippedOptimizer,
    GlobalNorm,
    NonFiniteGradError,
    ZClip,
    wrap,
)
from secateurs.errors import SecateursError

MAX_NORM = 0.5


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g) * 3, torch.randn(16, 2, generator=g)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def assert_same_state(a: dict, b: dict) -> None:
    """Optimizer state dicts equal bit for bit (tensors) and by value (the rest)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_wrapped_step_equals_clip_grad_norm_then_step(name: str) -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(OPTIMIZERS[name](list(ours.parameters())), GlobalNorm(MAX_NORM))
    ref_opt = OPTIMIZERS[name](list(ref.parameters()))
    for step in range(5):
        opt.zero_grad()
        loss_of(ours, step).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
    assert_same_params(ours, ref)
    assert opt.log.total_steps == 5
    assert opt.log.clipped_steps == 5  # these batches have norms far above 0.5


def lbfgs_closures(
    opt: torch.optim.Optimizer,
    ours: torch.nn.Module,
    ref_opt: torch.optim.Optimizer,
    ref: torch.nn.Module,
    step: int,
    *,
    edit_ref_grads: Callable[[torch.nn.Module], None] | None = None,
    evaluations: list[int] | None = None,
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Closures for the wrapped LBFGS and for a reference that clips by hand in its closure
    (after ``edit_ref_grads``); ``evaluations[0]`` counts the wrapped closure's calls."""

    def closure() -> torch.Tensor:
        if evaluations is not None:
            evaluations[0] += 1
        opt.zero_grad()
        loss = loss_of(ours, step)
        loss.backward()
        return loss

    def ref_closure() -> torch.Tensor:
        ref_opt.zero_grad()
        loss = loss_of(ref, step)
        loss.backward()
        if edit_ref_grads is not None:
            edit_ref_grads(ref)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        return loss

    return closure, ref_closure


def test_wrapped_lbfgs_clips_every_closure_evaluation() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.LBFGS(ours.parameters(), lr=0.5, max_iter=4), GlobalNorm(MAX_NORM))
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=4)
    for step in range(3):
        closure, ref_closure = lbfgs_closures(opt, ours, ref_opt, ref, step)
        got = opt.step(closure)
        want = ref_opt.step(ref_closure)
        assert torch.equal(got, want)
    assert_same_params(ours, ref)
    assert opt.log.total_steps == 3


def test_closure_step_with_nan_loss_skips_without_calling_the_optimizer() -> None:
    model = make_model()
    opt = wrap(torch.optim.LBFGS(model.parameters(), lr=0.5), GlobalNorm(MAX_NORM))
    before = copy.deepcopy(model.state_dict())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, 0) * math.nan
        loss.backward()
        return loss

    opt.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(opt.state) == 0
    assert opt.log.skipped() == [True]


def test_lr_scheduler_drives_the_wrapped_optimizer() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.SGD(ours.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(5):
            opt.zero_grad()
            loss_of(ours, step).backward()
            opt.step()
            sched.step()
            ref_opt.zero_grad()
            loss_of(ref, step).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
            ref_opt.step()
            ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert_same_params(ours, ref)


def scaled_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    *,
    unscale_first: bool,
) -> None:
    opt.zero_grad()
    scaler.scale(loss_of(model, step)).backward()
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize(
    "unscale_first", [False, True], ids=["scaler-unscales", "explicit-unscale"]
)
def test_grad_scaler_step_clips_unscaled_gradients(unscale_first: bool) -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.SGD(ours.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref_norms = []
    for step in range(3):
        scaled_step(ours, opt, scaler, step, unscale_first=unscale_first)
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item())
        ref_opt.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # the rule saw the unscaled norms (scaled ones would be 4096 times larger), once each step
    assert opt.log.norms() == pytest.approx(ref_norms, rel=1e-5)


def test_grad_scaler_skips_an_overflowing_step_before_the_wrapper() -> None:
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    scaler.scale(loss_of(model, 0) * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert scaler.get_scale() == 2.0**11
    assert opt.log.total_steps == 0


def nan_grads(model: torch.nn.Module) -> None:
    loss_of(model, 99).backward()
    next(model.parameters()).grad[0, 0] = math.nan


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skip_leaves_params_and_optimizer_state_bit_identical_on_a_nan_step(name: str) -> None:
    model = make_model()
    opt = wrap(OPTIMIZERS[name](list(model.parameters())), GlobalNorm(MAX_NORM), nonfinite="skip")
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.optimizer.state_dict())

    opt.zero_grad()
    nan_grads(model)
    opt.step()

    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    assert_same_state(opt.optimizer.state_dict(), state_before)
    assert opt.log.skipped() == [False, False, False, True]
    assert opt.log.skipped_steps == 1


def test_skip_then_continue_matches_a_run_that_never_saw_the_nan_step() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.Adam(ours.parameters(), lr=0.01), GlobalNorm(MAX_NORM))
    ref_opt = wrap(torch.optim.Adam(ref.parameters(), lr=0.01), GlobalNorm(MAX_NORM))
    for step in range(4):
        if step == 2:
            opt.zero_grad()
            nan_grads(ours)
            opt.step()
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(model, step).backward()
            o.step()
    assert_same_params(ours, ref)


def test_skip_on_the_first_step_creates_no_optimizer_state() -> None:
    model = make_model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.01), GlobalNorm(MAX_NORM))
    nan_grads(model)
    opt.step()
    assert len(opt.state) == 0
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())


def test_skip_restores_state_an_optimizer_replaces_instead_of_updating_in_place() -> None:
    class Replacing(torch.optim.SGD):
        """Keeps a running sum in state, assigning a new tensor each step."""

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> float | None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        st = self.state[p]
                        st["total"] = st.get("total", torch.zeros_like(p)) + p.grad
            return super().step(closure)

    model = make_model()
    opt = wrap(Replacing(model.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    loss_of(model, 0).backward()
    opt.step()
    before = {p: opt.state[p]["total"].clone() for p in model.parameters()}
    opt.zero_grad()
    nan_grads(model)
    opt.step()
    for p in model.parameters():
        assert torch.equal(opt.state[p]["total"], before[p])


def test_skip_restores_a_step_count_kept_in_the_param_group() -> None:
    class GroupCounting(torch.optim.SGD):
        """Counts steps in the param group, as some third-party optimizers do."""

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> float | None:
            for group in self.param_groups:
                group["step"] = group.get("step", 0) + 1
            return super().step(closure)

    model = make_model()
    opt = wrap(GroupCounting(model.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    loss_of(model, 0).backward()
    opt.step()
    opt.zero_grad()
    nan_grads(model)
    opt.step()
    assert opt.param_groups[0]["step"] == 1
    assert opt.log.skipped() == [False, True]


def test_error_policy_names_the_step_and_leaves_params_untouched() -> None:
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(MAX_NORM), nonfinite="error")
    for step in range(2):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    nan_grads(model)
    with pytest.raises(NonFiniteGradError, match="step 3"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_ignore_policy_steps_with_nan_like_plain_pytorch() -> None:
    model = make_model()
    opt = wrap(
        torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(MAX_NORM), nonfinite="ignore"
    )
    nan_grads(model)
    opt.step()
    assert torch.isnan(next(model.parameters())).all()
    assert opt.log.skipped() == [False]


def test_unknown_nonfinite_policy_is_rejected() -> None:
    with pytest.raises(
        SecateursError, match=r"nonfinite: got 'drop'; allowed: skip, error, ignore"
    ):
        wrap(torch.optim.SGD(make_model().parameters(), lr=0.1), None, nonfinite="drop")


def test_wrap_rejects_something_that_is_not_an_optimizer() -> None:
    with pytest.raises(SecateursError, match="optimizer"):
        wrap(make_model(), GlobalNorm(1.0))  # type: ignore[arg-type]


def test_gradient_accumulation_clips_the_accumulated_gradient_once() -> None:
    ours, ref, per_micro = make_model(), make_model(), make_model()
    opt = wrap(torch.optim.SGD(ours.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    for micro in range(4):
        (loss_of(ours, micro) / 4).backward()
    opt.step()

    for micro in range(4):
        (loss_of(ref, micro) / 4).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    torch.optim.SGD(ref.parameters(), lr=0.1).step()

    summed = [torch.zeros_like(p) for p in per_micro.parameters()]
    for micro in range(4):  # the mistake this guards against: clipping every micro-batch
        per_micro.zero_grad()
        (loss_of(per_micro, micro) / 4).backward()
        torch.nn.utils.clip_grad_norm_(per_micro.parameters(), MAX_NORM)
        for total, p in zip(summed, per_micro.parameters(), strict=True):
            total += p.grad
    for total, p in zip(summed, per_micro.parameters(), strict=True):
        p.grad = total
    torch.optim.SGD(per_micro.parameters(), lr=0.1).step()

    assert_same_params(ours, ref)
    assert not torch.allclose(next(ours.parameters()), next(per_micro.parameters()))
    assert opt.log.total_steps == 1


def test_rule_none_logs_norms_without_clipping() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.SGD(ours.parameters(), lr=0.1), None)
    loss_of(ours, 0).backward()
    loss_of(ref, 0).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    opt.step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert_same_params(ours, ref)
    assert opt.log.norms() == [pytest.approx(norm.item())]
    assert opt.log.clipped() == [False] and opt.log.thresholds() == [math.inf]


def train(opt: ClippedOptimizer, model: torch.nn.Module, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def test_state_dict_round_trip_resumes_rule_state_log_and_step_count() -> None:
    straight, first, resumed = make_model(), make_model(), make_model()

    def make(model: torch.nn.Module) -> ClippedOptimizer:
        return wrap(torch.optim.Adam(model.parameters(), lr=0.01), AutoClip(percentile=50))

    opt_straight = make(straight)
    train(opt_straight, straight, range(8))

    opt_first = make(first)
    train(opt_first, first, range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    train(opt_resumed, resumed, range(4, 8))

    assert_same_params(straight, resumed)
    assert opt_resumed.steps == 8
    assert opt_resumed.log.thresholds() == opt_straight.log.thresholds()
    assert opt_resumed.log.norms() == opt_straight.log.norms()


def test_wrapped_optimizer_exposes_inner_param_groups_state_and_attributes() -> None:
    inner = torch.optim.Adam(make_model().parameters(), lr=0.01)
    opt = wrap(inner, ZClip())
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert opt.optimizer is inner and isinstance(opt.rule, ZClip)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.log, ClipLog)


def test_wrap_uses_a_given_log() -> None:
    log = ClipLog()
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(1.0), log=log)
    loss_of(model, 0).backward()
    opt.step()
    assert opt.log is log and log.total_steps == 1


def test_wrapped_optimizer_can_be_deep_copied() -> None:
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(1.0))
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["lr"] == 0.1 and clone.rule.max_norm == 1.0


def zero_first_weight_grad(opt: ClippedOptimizer) -> None:
    opt.param_groups[0]["params"][0].grad.zero_()


def test_pre_clip_hook_runs_before_the_rule_and_its_handle_removes_it() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.SGD(ours.parameters(), lr=0.1), GlobalNorm(MAX_NORM))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    seen: list[ClippedOptimizer] = []
    handle = opt.register_pre_clip_hook(zero_first_weight_grad)
    opt.register_pre_clip_hook(seen.append)
    for step in range(2):
        opt.zero_grad()
        loss_of(ours, step).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        first, *rest = ref.parameters()
        first.grad.zero_()
        want = torch.nn.utils.get_total_norm([p.grad for p in rest])
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
        assert opt.log.norms()[-1] == pytest.approx(want.item(), rel=1e-6)
    assert_same_params(ours, ref)
    assert seen == [opt, opt]

    handle.remove()
    opt.zero_grad()
    loss_of(ours, 2).backward()
    full = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()])
    opt.step()
    assert opt.log.norms()[-1] == pytest.approx(full.item(), rel=1e-6)
    assert len(seen) == 3


def test_pre_clip_hook_runs_after_every_closure_evaluation_before_its_clip() -> None:
    ours, ref = make_model(), make_model()
    opt = wrap(torch.optim.LBFGS(ours.parameters(), lr=0.5, max_iter=4), GlobalNorm(MAX_NORM))
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=4)
    evaluations, hook_calls = [0], [0]

    def hook(o: ClippedOptimizer) -> None:
        hook_calls[0] += 1
        zero_first_weight_grad(o)

    opt.register_pre_clip_hook(hook)
    for step in range(3):
        closure, ref_closure = lbfgs_closures(
            opt,
            ours,
            ref_opt,
            ref,
            step,
            edit_ref_grads=lambda m: next(m.parameters()).grad.zero_(),
            evaluations=evaluations,
        )
        assert torch.equal(opt.step(closure), ref_opt.step(ref_closure))
    assert_same_params(ours, ref)
    assert evaluations[0] > 3  # the line search evaluated again, and the hook ran each time
    assert hook_calls == evaluations


def test_deepcopy_and_pickle_leave_pre_clip_hooks_behind() -> None:
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(1.0))
    calls: list[str] = []
    opt.register_pre_clip_hook(lambda o: calls.append("original"))  # a lambda cannot be pickled
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()
        clone.register_pre_clip_hook(lambda o: calls.append("clone"))
        clone.step()
        assert clone.log.total_steps == 2
    loss_of(model, 0).backward()
    opt.step()
    assert calls == ["clone", "clone", "original"]


# torch.compile of a wrapped step: tests/test_clip_compile.py (fullgraph, every rule and policy)
