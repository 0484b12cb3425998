"""Clipping on a CUDA device: same results as torch there, and no host sync in any step.

``torch.cuda.set_sync_debug_mode("error")`` makes every operation that would synchronise the
host with the GPU (``.item()``, ``bool()``, a copy to the CPU, ``nonzero``) raise, so a rule or
a wrapped optimizer step that runs under it never stalls the GPU pipeline. These tests skip on
machines without CUDA (CI has none); the meta-device tests in test_clip_nosync.py prove the
same property everywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from test_clip_functional import clone, random_params

from secateurs.clip import (
    METHODS,
    Chain,
    GlobalNorm,
    agc_,
    build,
    by_global_norm_,
    by_norm_,
    by_value_,
    clamp_params_,
    wrap,
)
from secateurs.prune.masks import mask_grads_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REQUIRED = {
    "value": {"clip_value": 0.1},
    "norm": {"max_norm": 1.0},
    "global_norm": {"max_norm": 1.0},
}
SHAPES = [(64, 32), (64,), (16, 8, 3, 3), (16,), (70000,)] + [(8, 4), (8,)] * 40


@contextmanager
def no_sync() -> Iterator[None]:
    """Raise on any host-device synchronisation inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_params(
    seed: int = 0, scale: float = 1.0, shapes: list[tuple[int, ...]] = SHAPES
) -> list[torch.nn.Parameter]:
    params = []
    for p in random_params(shapes, seed, scale):
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        params.append(q)
    return params


def cpu_copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().cpu())
        q.grad = None if p.grad is None else p.grad.cpu()
        out.append(q)
    return out


def test_sync_debug_mode_catches_a_host_read() -> None:
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError), no_sync():
        bool(x.sum() > 0)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_by_global_norm_equals_torch_on_cuda(norm_type: float, max_norm: float) -> None:
    ours, ref = cuda_params(), cuda_params()
    with no_sync():
        norm = by_global_norm_(ours, max_norm, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=True)
    assert norm.device.type == "cuda"
    torch.testing.assert_close(norm, ref_norm, rtol=0, atol=0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_functionals_on_cuda_equal_the_same_functionals_on_the_cpu() -> None:
    for fn, kwargs in [
        (by_value_, {"clip_value": 0.3}),
        (by_norm_, {"max_norm": 0.5}),
        (agc_, {"clipping": 0.02}),
    ]:
        gpu = cuda_params(scale=0.5)
        cpu = cpu_copy(gpu)
        with no_sync():
            norm = fn(gpu, **kwargs)
        ref = fn(cpu, **kwargs)
        torch.testing.assert_close(norm.cpu(), ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(gpu, cpu, strict=True):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)
    gpu = cuda_params()
    cpu = cpu_copy(gpu)
    with no_sync():
        clamp_params_(gpu, -0.5, 0.5)
    clamp_params_(cpu, -0.5, 0.5)
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a.detach().cpu(), b.detach())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_rule_runs_on_cuda_without_a_sync_and_matches_the_cpu(method: str) -> None:
    kwargs = REQUIRED.get(method, {})
    gpu_rule, cpu_rule = build(method, **kwargs), build(method, **kwargs)
    for step in range(6):  # through warm-up into the steady state of the adaptive rules
        gpu = cuda_params(seed=step, scale=1.0 + 3.0 * (step == 4))
        cpu = cpu_copy(gpu)
        with no_sync():
            stats = gpu_rule(gpu)
        ref = cpu_rule(cpu)
        assert stats.norm_before.device.type == "cuda" and stats.clipped.device.type == "cuda"
        torch.testing.assert_close(stats.norm_before.cpu(), ref.norm_before, rtol=1e-5, atol=0)
        torch.testing.assert_close(stats.threshold.cpu(), ref.threshold, rtol=1e-5, atol=0)
        assert bool(stats.clipped) == bool(ref.clipped)
        for a, b in zip(gpu, cpu, strict=True):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)
    for value in gpu_rule.state_dict().values():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cuda"


def test_chain_runs_on_cuda_without_a_sync() -> None:
    rule = Chain(build("agc"), build("zclip", warmup_steps=2), GlobalNorm(1.0))
    steps = [cuda_params(seed=step) for step in range(4)]
    with no_sync():
        for params in steps:
            rule(params)


@pytest.mark.parametrize("method", ["none", "global_norm", "autoclip", "zclip", "agc", "adagc"])
def test_wrapped_sgd_skip_step_runs_on_cuda_without_a_sync(method: str) -> None:
    params = cuda_params()
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in params:  # the step that creates optimizer state reads one flag (see guard.py)
        inner.state[p]["momentum_buffer"] = torch.zeros_like(p)
    opt = wrap(inner, build(method, **REQUIRED.get(method, {})), nonfinite="skip")
    masks = [torch.rand(p.shape, device="cuda") > 0.5 for p in params]
    opt.register_pre_clip_hook(lambda o: mask_grads_(params, masks))
    with no_sync():
        for _ in range(3):
            opt.step()
    assert opt.log.total_steps == 3


def test_skip_leaves_params_and_momentum_bit_identical_on_a_nan_step_on_cuda() -> None:
    params = cuda_params()
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = wrap(inner, GlobalNorm(1.0), nonfinite="skip")
    opt.step()  # creates the momentum buffers
    before = [p.detach().clone() for p in params]
    momenta = [inner.state[p]["momentum_buffer"].clone() for p in params]
    params[2].grad[0, 0, 0, 0] = math.nan
    with no_sync():
        opt.step()
    for p, b, m in zip(params, before, momenta, strict=True):
        assert torch.equal(p.detach(), b)
        assert torch.equal(inner.state[p]["momentum_buffer"], m)
    assert opt.log.skipped_steps == 1


def test_grad_scaler_unscales_before_the_wrapper_clips_on_cuda() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    model = model.cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    reference = reference.cuda()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), GlobalNorm(0.1))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler, ref_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    for _ in range(3):
        for m, o, s in ((model, opt, scaler), (reference, ref_opt, ref_scaler)):
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            s.scale(loss).backward()
            if o is ref_opt:  # the documented manual recipe: unscale, clip, step
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            s.step(o)
            s.update()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["autoclip", "zclip"])
def test_graphed_threshold_update_equals_the_eager_one_through_nan_resume_and_copy(
    method: str,
) -> None:
    """AutoClip/ZClip replay their bookkeeping as a CUDA graph (secateurs.clip._graphs): the
    same thresholds and gradients as the eager update, with no host sync, through a NaN step,
    a state_dict load (new state tensors: captured again), a changed setting (captured again)
    and a deepcopy (which captures its own graph)."""
    kwargs = {"warmup_steps": 3} if method == "zclip" else {"history": 8}
    graphed, eager = build(method, **kwargs), build(method, cuda_graph=False, **kwargs)
    steps = []
    for step in range(30):  # inputs made before any no_sync block (.cuda() is a sync)
        gpu = cuda_params(seed=step, scale=1.0 + 4.0 * (step % 7 == 6))
        ref = clone(gpu)
        if step == 12:
            gpu[0].grad[0, 0] = math.nan
            ref[0].grad[0, 0] = math.nan
        steps.append((gpu, ref))
    results = []
    for step, (gpu, ref) in enumerate(steps):
        if step == 18:  # resume both from the eager rule's state
            saved = eager.state_dict()
            graphed.load_state_dict(saved)
            eager.load_state_dict(saved)
        if step == 21:  # a setting a schedule might change
            for rule in (graphed, eager):
                if method == "zclip":
                    rule.z_thresh = 2.0
                else:
                    rule.percentile = 50.0
        if step == 24:
            graphed = copy.deepcopy(graphed)
        with no_sync():
            results.append((graphed(gpu), eager(ref)))
    for (gpu, ref), (got, want) in zip(steps, results, strict=True):
        for field in ("norm_before", "norm_after", "threshold", "clipped"):
            a, b = getattr(got, field), getattr(want, field)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
        for p, q in zip(gpu, ref, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, equal_nan=True)
    assert graphed._update.replays > 0 and eager._update.replays == 0
    # stats of earlier steps are copies, not the graph's output buffers
    first = graphed(cuda_params(seed=100))
    kept = first.threshold.clone()
    graphed(cuda_params(seed=101, scale=50.0))
    assert torch.equal(first.threshold, kept)


def test_agc_on_cuda_runs_as_one_triton_kernel_when_triton_is_installed() -> None:
    """Tensors mostly of their own shape go to the kernel; many small ones of two shapes
    (stacked by the per-tensor path in a few launches) do not."""
    pytest.importorskip("triton")
    from secateurs.clip.unitwise import UnitPlan, _Segment

    shapes = [(64, 32), (64,), (16, 8, 3, 3), (16,), (70000,), (8, 4), (8,), (8, 4), (8,)]
    gpu = cuda_params(scale=0.5, shapes=shapes)
    cpu = cpu_copy(gpu)
    rule = build("agc")
    with no_sync():
        for _ in range(3):  # the first call compiles the kernel, later ones reuse the tables
            stats = rule(gpu)
            ref = build("agc")(cpu)
    assert rule._plan is not None and not any(isinstance(s, _Segment) for s in rule._plan.segments)
    torch.testing.assert_close(stats.norm_after.cpu(), ref.norm_after, rtol=1e-5, atol=0)
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)
    many = cuda_params()  # 85 tensors in 7 groups
    plan = UnitPlan([p.grad for p in many], many)
    assert all(isinstance(s, _Segment) for s in plan.segments)


def test_adagc_with_parameters_without_gradients_runs_on_cuda_without_a_sync() -> None:
    """The positions of the parameters that have gradients go to the GPU from pinned memory
    (once per set of positions), not through a synchronising copy."""
    rule, ref_rule = build("adagc", warmup_steps=2), build("adagc", warmup_steps=2)
    for step in range(5):
        gpu = cuda_params(seed=step)
        gpu[1].grad = None
        cpu = cpu_copy(gpu)
        with no_sync():
            stats = rule(gpu)
        ref = ref_rule(cpu)
        torch.testing.assert_close(stats.threshold.cpu(), ref.threshold, rtol=1e-5, atol=0)
        for a, b in zip(gpu, cpu, strict=True):
            if a.grad is not None:
                torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)
