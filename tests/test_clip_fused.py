"""The one-kernel AGC (secateurs.clip._agc_fused) against the per-tensor path.

The kernel runs through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``), so its
source is checked on machines without a GPU; another test compiles it for a Hopper GPU. On a machine with CUDA
this module is skipped: test_clip_cuda.py runs the compiled kernel there. The per-tensor path
is itself checked against a hand computation in test_clip_functional.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA: test_clip_cuda.py runs the compiled kernel", allow_module_level=True)
# Triton reads it when first imported, so it stays set in this process (on a machine without
# CUDA nothing else here uses Triton)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_clip_functional import clone

from secateurs.clip import AGC
from secateurs.clip.unitwise import UnitPlan, _Segment, agc_apply_

# Linear, bias, Conv, a 1-D tensor longer than one kernel block, a scalar, an empty tensor,
# tensors with no units, and small tensors the per-tensor path stacks
SHAPES = [(24, 12), (24,), (6, 4, 3, 3), (5000,), (), (0, 5), (3, 0), (8, 4), (8,), (8, 4), (8,)]


def make(dtype: torch.dtype, grad_scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in SHAPES:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype))
        # spread the units' gradient norms so some are clipped and some are not
        rows = torch.rand(s[:1] if len(s) > 1 else (), generator=g) * 4
        p.grad = (
            torch.randn(s, generator=g)
            * grad_scale
            * rows.reshape(tuple(rows.shape) + (1,) * (len(s) - 1))
        ).to(dtype)
        params.append(p)
    return params


def run(params: list[torch.nn.Parameter], clipping: float, eps: float, fused: bool):
    grads = [p.grad for p in params]
    plan = UnitPlan(grads, params, fused=fused)
    return plan, agc_apply_(params, grads, clipping, eps, plan)


TOL = {torch.float32: (1e-5, 1e-8), torch.float16: (2e-3, 1e-6), torch.bfloat16: (2e-2, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("clipping", "eps"), [(0.05, 1e-3), (1e-5, 1e-3)])
def test_fused_agc_equals_the_per_tensor_path(
    dtype: torch.dtype, clipping: float, eps: float
) -> None:
    # (1e-5, 1e-3): bounds under 1e-6, the exact formula; (0.05, 1e-3): min(1, bound / g)
    fused = make(dtype, grad_scale=0.004)
    eager = clone(fused)
    plan, got = run(fused, clipping, eps, fused=True)
    _, want = run(eager, clipping, eps, fused=False)
    assert not any(isinstance(s, _Segment) for s in plan.segments)
    rtol, atol = TOL[dtype]
    for field in ("grad_norm", "clipped_norm", "threshold"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=rtol, atol=atol)
    assert bool(got.clipped) and bool(want.clipped)
    changed = 0
    for p, q, before in zip(fused, eager, make(dtype, grad_scale=0.004), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol)
        changed += int(not torch.equal(p.grad, before.grad))
    assert changed > 0  # some gradients were scaled


def test_fused_plan_follows_gradients_that_move_and_falls_back_for_strided_ones() -> None:
    params = make(torch.float32, grad_scale=0.004)
    grads = [p.grad for p in params]
    plan = UnitPlan(grads, params, fused=True)
    rule_ref = clone(params)
    for step in range(3):
        fresh = make(torch.float32, grad_scale=0.004, seed=step + 1)
        for p, f, r in zip(params, fresh, rule_ref, strict=True):
            p.grad = f.grad.clone()  # new tensors at new addresses while the old ones live
            r.grad = f.grad.clone()
        if step == 2:  # a transposed gradient: this step takes the per-tensor path
            params[0].grad = params[0].grad.t().contiguous().t()
            assert not params[0].grad.is_contiguous()
        grads = [p.grad for p in params]
        assert plan.fits(params, grads)
        got = agc_apply_(params, grads, 0.05, 1e-3, plan)
        _, want = run(rule_ref, 0.05, 1e-3, fused=False)
        torch.testing.assert_close(got.clipped_norm, want.clipped_norm, rtol=1e-5, atol=0)
        for p, r in zip(params, rule_ref, strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8)
        segment = plan.segments[0]
        assert segment._g_at[1] == params[1].grad.data_ptr() or step == 2


def test_fused_plan_takes_the_per_tensor_path_when_a_tensor_no_longer_matches_its_table() -> None:
    """The kernel reads raw addresses, so a weight of another dtype or a tensor of another
    shape (the second of a stacked pair, which the plan's own check does not look at) must
    never reach it: the per-tensor path then clips right, or raises."""
    params = make(torch.float32, grad_scale=0.004)
    plan = UnitPlan([p.grad for p in params], params, fused=True)
    ref = clone(params)
    params[0].data = params[0].data.clone()  # a weight at a new address: the table follows
    agc_apply_(params, [p.grad for p in params], 0.05, 1e-3, plan)
    run(ref, 0.05, 1e-3, fused=False)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8)
    assert plan.segments[0]._w_at[0] == params[0].data_ptr()
    params[0].data = params[0].data.double()  # float64 weight, float32 gradient
    with pytest.raises(RuntimeError, match="dtype"):  # the per-tensor path's error
        agc_apply_(params, [p.grad for p in params], 0.05, 1e-3, plan)
    params[0].data = params[0].data.float()
    params[9].data = torch.zeros(8, 2)  # the second (8, 4) tensor, with a gradient to match
    params[9].grad = torch.ones(8, 2)
    grads = [p.grad for p in params]
    assert plan.fits(params, grads)  # the plan checks the first of each group only
    with pytest.raises(RuntimeError):
        agc_apply_(params, grads, 0.05, 1e-3, plan)


def test_fused_agc_propagates_nan_like_the_per_tensor_path() -> None:
    """A NaN weight makes its unit's bound NaN, a NaN gradient its factor: as in torch."""
    for exact in (False, True):
        clipping = 1e-5 if exact else 0.05
        fused = make(torch.float32, grad_scale=0.004)
        fused[0].data[3, 5] = float("nan")
        fused[2].grad[1, 0, 0, 0] = float("nan")
        eager = clone(fused)
        _, got = run(fused, clipping, 1e-3, fused=True)
        _, want = run(eager, clipping, 1e-3, fused=False)
        for field in ("grad_norm", "clipped_norm", "threshold"):
            a, b = getattr(got, field), getattr(want, field)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0, equal_nan=True)
        for p, q in zip(fused, eager, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, equal_nan=True)
        assert fused[0].grad[3].isnan().all() and not fused[0].grad[2].isnan().any()


def test_fused_agc_takes_channels_last_conv_weights_without_falling_back() -> None:
    conv = torch.nn.Conv2d(6, 10, 3).to(memory_format=torch.channels_last)
    conv(torch.randn(4, 6, 9, 9).to(memory_format=torch.channels_last)).square().sum().backward()
    params = list(conv.parameters())
    assert not params[0].is_contiguous() and not params[0].grad.is_contiguous()
    ref = clone(params)
    plan, got = run(params, 0.002, 1e-3, fused=True)
    _, want = run(ref, 0.002, 1e-3, fused=False)
    assert not plan._eager  # the per-tensor layout was never needed
    assert bool(got.clipped)
    torch.testing.assert_close(got.clipped_norm, want.clipped_norm, rtol=1e-5, atol=0)
    for p, q in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_units_too_long_for_the_kernels_int32_offsets_take_the_per_tensor_path() -> None:
    from secateurs.clip._agc_fused import FusedSegment

    assert FusedSegment.supports([torch.empty(3, 1000, device="meta")])
    assert not FusedSegment.supports([torch.empty(2, 2**31, device="meta")])
    assert not FusedSegment.supports([torch.empty(2**31, device="meta")])  # one unit


def test_float64_and_the_cpu_default_take_the_per_tensor_path() -> None:
    params = make(torch.float64, grad_scale=0.004)
    plan = UnitPlan([p.grad for p in params], params, fused=True)
    assert all(isinstance(s, _Segment) for s in plan.segments)
    rule = AGC()
    rule(make(torch.float32, grad_scale=0.004))
    assert rule._plan is not None and all(isinstance(s, _Segment) for s in rule._plan.segments)


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from secateurs.clip._agc_fused import _agc_units
for elem in ("fp32", "bf16", "fp16"):
    for exact in (True, False):
        signature = {
            "g_ptrs": "*i64", "w_ptrs": "*i64", "unit_tensor": "*i32", "unit_start": "*i64",
            "unit_len": "*i32", "out": "*" + elem, "n_units": "i32", "clipping": "fp32",
            "eps": "fp32", "EXACT": "constexpr", "BLOCK": "constexpr",
        }
        source = ASTSource(_agc_units, signature, constexprs={"EXACT": exact, "BLOCK": 1024})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], (elem, exact)
print("compiled")
"""


@pytest.mark.slow
def test_the_kernel_compiles_for_an_h100_without_one() -> None:
    """The interpreter does not check what the compiler rejects (types, control flow): compile
    the kernel to a Hopper cubin with the ptxas that ships in Triton's wheel, in a process
    without TRITON_INTERPRET."""
    backends = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia"
    if not (backends / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
