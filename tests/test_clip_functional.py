"""The clipping functions against independent references (torch's own, or hand-computed values)."""

from __future__ import annotations

import doctest
import importlib
import math
import threading

import pytest
import torch

from secateurs.clip import (
    _tensors,
    agc_,
    by_global_norm_,
    by_norm_,
    by_value_,
    clamp_params_,
    unitwise,
)
from secateurs.errors import SecateursError

NORM_TYPES = [1.0, 2.0, math.inf]


def random_params(shapes: list[tuple[int, ...]], seed: int, scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * scale
        params.append(p)
    return params


def make_params(seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    return random_params([(8, 5), (8,), (3, 2, 3, 3), (3,), (17,)], seed, scale)


def clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_same_grads(a: list[torch.nn.Parameter], b: list[torch.nn.Parameter]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_by_global_norm_equals_torch_clip_grad_norm_when_clipping(norm_type: float) -> None:
    ours, ref = make_params(), make_params()
    norm = by_global_norm_(ours, max_norm=0.5, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type, foreach=True)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    torch.testing.assert_close(norm, ref_norm, rtol=0, atol=0)
    assert_same_grads(ours, ref)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_by_global_norm_leaves_grads_untouched_under_the_threshold(norm_type: float) -> None:
    ours, ref = make_params(), make_params()
    norm = by_global_norm_(ours, max_norm=1e6, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1e6, norm_type=norm_type)
    torch.testing.assert_close(norm, ref_norm, rtol=0, atol=0)
    assert_same_grads(ours, ref)


def test_by_global_norm_turns_nan_grads_into_nan_like_torch() -> None:
    ours, ref = make_params(), make_params()
    ours[0].grad[0, 0] = math.nan
    ref[0].grad[0, 0] = math.nan
    assert torch.isnan(by_global_norm_(ours, 1.0))
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(torch.isnan(x.grad), torch.isnan(y.grad))


def test_by_global_norm_skips_params_without_grad() -> None:
    params = make_params()
    params[1].grad = None
    ref = clone(params)
    by_global_norm_(params, 0.1)
    torch.nn.utils.clip_grad_norm_(ref, 0.1)
    assert params[1].grad is None
    assert_same_grads(
        [p for p in params if p.grad is not None], [p for p in ref if p.grad is not None]
    )


def test_by_global_norm_accepts_a_single_tensor_and_the_string_inf() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, -4.0, 1.0])
    assert by_global_norm_(p, 2.0, norm_type="inf").item() == 4.0
    torch.testing.assert_close(p.grad, torch.tensor([3.0, -4.0, 1.0]) * (2.0 / (4.0 + 1e-6)))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_by_norm_clips_each_tensor_like_torch_on_that_tensor_alone(norm_type: float) -> None:
    ours, ref = make_params(), make_params()
    total = by_norm_(ours, max_norm=1.0, norm_type=norm_type)
    ref_norms = [torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=norm_type) for p in ref]
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.stack(ref_norms), norm_type))
    assert_same_grads(ours, ref)


def test_by_value_equals_torch_clip_grad_value_() -> None:
    ours, ref = make_params(), make_params()
    expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
    norm = by_value_(ours, 0.3)
    torch.nn.utils.clip_grad_value_(ref, 0.3)
    torch.testing.assert_close(norm, expected_norm)
    assert_same_grads(ours, ref)


def test_agc_matches_hand_computed_values() -> None:
    # clipping 0.01, eps 1e-3: a unit's gradient may have norm clipping * max(|W_unit|, eps)
    linear = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    linear.grad = torch.tensor([[0.3, 0.4], [1e-6, 0.0]])  # row 0: 0.5 > 0.05; row 1: 1e-6 < 1e-5
    conv = torch.nn.Parameter(torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]]))  # [2, 1, 1, 2]
    conv.grad = torch.tensor([[[[0.0, 1.0]]], [[[0.01, 0.0]]]])  # ch 0: 1 > 0.01; ch 1: 0.01 < 0.02
    bias = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    bias.grad = torch.tensor([0.0, 0.005])  # whole vector: 0.005 < 0.01
    gain = torch.nn.Parameter(torch.tensor([2.0]))
    gain.grad = torch.tensor([1.0])  # 1 > 0.02
    params = [linear, conv, bias, gain]
    before = math.sqrt(0.5**2 + 1e-12 + 1.0 + 0.01**2 + 0.005**2 + 1.0)

    norm = agc_(params, clipping=0.01, eps=1e-3)

    assert norm.item() == pytest.approx(before, rel=1e-6)
    torch.testing.assert_close(linear.grad, torch.tensor([[0.03, 0.04], [1e-6, 0.0]]))
    torch.testing.assert_close(conv.grad, torch.tensor([[[[0.0, 0.01]]], [[[0.01, 0.0]]]]))
    torch.testing.assert_close(bias.grad, torch.tensor([0.0, 0.005]))
    torch.testing.assert_close(gain.grad, torch.tensor([0.02]))


def reference_agc(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """Row-by-row loop, the plainest reading of Brock et al.'s formula."""
    units = (w.shape[0], math.prod(w.shape[1:])) if w.dim() > 1 else (1, w.numel())
    rows_w = w.reshape(units)
    rows_g = g.reshape(rows_w.shape).clone()
    for i in range(rows_g.shape[0]):
        bound = clipping * max(rows_w[i].norm().item(), eps)
        gn = rows_g[i].norm().item()
        if gn >= bound:
            rows_g[i] *= bound / max(gn, 1e-6)
    return rows_g.reshape(g.shape)


def test_agc_on_many_small_and_some_large_tensors_matches_a_row_loop() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3)] * 6 + [(4,)] * 6 + [(300, 300), (70000,), (5, 2, 3, 3)]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * 0.05
        params.append(p)
    expected = [reference_agc(p.detach(), p.grad, 0.02, 1e-3) for p in params]
    agc_(params, clipping=0.02)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_agc_across_chunks_and_slices_matches_a_row_loop() -> None:
    # 40 stacked (500, 4) tensors: 20,000 units, more than one arithmetic slice (SLICE_UNITS);
    # a (1100, 1000) weight: more elements than one chunk (CHUNK_NUMEL) on its own; 300 stacked
    # (64, 64) tensors: a stack cut into several chunks
    shapes = [(500, 4)] * 40 + [(1100, 1000), (1100,), (7,)] + [(64, 64)] * 300
    params = random_params(shapes, seed=5, scale=0.05)
    assert unitwise.SLICE_UNITS < 40 * 500 and unitwise.CHUNK_NUMEL < 1100 * 1000
    assert unitwise.CHUNK_NUMEL < 300 * 64 * 64
    expected = [reference_agc(p.detach(), p.grad, 0.02, 1e-3) for p in params]
    agc_(params, clipping=0.02)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clipping", [0.01, 1e-4])  # bounds >= 1e-6, and bounds that may be less
def test_agc_on_tiny_gradients_matches_a_row_loop(clipping: float) -> None:
    params = random_params([(6, 3), (6, 3), (5,)], seed=1, scale=1.0)
    for p, scale in zip(params, [1e-9, 1e-7, 1e-8], strict=True):
        p.data.mul_(1e-4)  # weight rows far under eps: bound = clipping * eps
        p.grad.mul_(scale)
    expected = [reference_agc(p.detach(), p.grad, clipping, 1e-3) for p in params]
    agc_(params, clipping=clipping)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=0)


def test_agc_on_a_channels_last_conv_weight_matches_a_row_loop() -> None:
    conv = torch.nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
    conv(torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)).square().sum().backward()
    assert not conv.weight.grad.is_contiguous()
    expected = reference_agc(conv.weight.detach(), conv.weight.grad, 0.01, 1e-3)
    agc_([conv.weight], clipping=0.01)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-8)


def test_global_norm_on_two_threads_matches_torch_and_a_float64_reference() -> None:
    # with more than one thread, large CPU tensors take their 2-norm as a BLAS dot
    params = random_params([(300, 300), (70000,), (64, 3, 3, 3)], seed=2, scale=1.0)
    ref = clone(params)
    exact = torch.cat([p.grad.double().flatten() for p in params]).norm()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _tensors._dot_ok(params[1].grad, 2.0)
        norm = by_global_norm_(params, max_norm=1.0)
    finally:
        torch.set_num_threads(threads)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_clamp_params_clamps_values_and_returns_their_norm() -> None:
    params = make_params()
    expected = [p.detach().clamp(-0.5, 0.25) for p in params]
    norm_before = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in params]))
    norm = clamp_params_(params, -0.5, 0.25)
    torch.testing.assert_close(norm, norm_before)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), e)


def test_clamp_params_with_one_bound_only() -> None:
    p = torch.nn.Parameter(torch.tensor([-2.0, 3.0]))
    clamp_params_([p], max=1.0)
    assert p.detach().tolist() == [-2.0, 1.0]


@pytest.mark.parametrize(
    "module",
    ["functional", "rules", "autoclip", "registry", "log", "wrap", "__init__"],
)
def test_docstring_examples_run(module: str) -> None:
    name = "secateurs.clip" if module == "__init__" else f"secateurs.clip.{module}"
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0 and result.attempted > 0


def many_small_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Thousands-of-small-tensors layout (stacked by shape on the CPU), plus one large tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 12), (16,)] * 40 + [(3, 7), (300, 300)]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g)
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_by_global_norm_on_many_small_tensors_equals_torch_up_to_rounding(norm_type: float) -> None:
    ours, ref = many_small_params(), many_small_params()
    norm = by_global_norm_(ours, max_norm=1.0, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(norm, ref_norm)
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_by_norm_on_many_small_tensors_equals_torch_per_tensor(norm_type: float) -> None:
    ours, ref = many_small_params(), many_small_params()
    by_norm_(ours, max_norm=2.0, norm_type=norm_type)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], 2.0, norm_type=norm_type)
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


def test_cpu_stacks_share_one_scratch_buffer_across_shapes_dtypes_and_inference_mode() -> None:
    # the stacks of small tensors are views of one buffer a thread reuses; a fresh thread
    # makes it inside inference mode first, then clips outside it, with the float64 and the
    # float32 stacks and stacks larger than the buffer's first size (STACK_NUMEL) in one call
    many = 2 * _tensors.STACK_NUMEL // (16 * 12) + 3
    shapes = [(16, 12)] * many + [(5,)] * 30 + [(300, 300)]
    params = random_params(shapes, seed=4, scale=1.0)
    for p in params[::3]:
        p.data = p.data.double()
        p.grad = p.grad.double()
    norms: list[torch.Tensor] = []

    def clip_twice() -> None:
        try:
            with torch.inference_mode():
                norms.append(_tensors.total_norm([p.grad for p in params]))
            norms.append(by_global_norm_(params, max_norm=1e9))
            norms.append(_tensors.per_tensor_norms([p.grad for p in params]))
        except Exception as e:  # reported in the main thread
            norms.append(e)  # type: ignore[arg-type]

    each = torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])
    expected = torch.linalg.vector_norm(each)
    worker = threading.Thread(target=clip_twice)
    worker.start()
    worker.join()
    assert all(isinstance(n, torch.Tensor) for n in norms), norms
    # float32 sums of a few hundred thousand squares: float32 rounding against float64
    for total in norms[:2]:
        torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(norms[2].double(), each, rtol=1e-5, atol=0)


def test_agc_plan_stacks_every_small_group_in_one_buffer_and_lone_tensors_in_none() -> None:
    grads = [p.grad for p in random_params([(8, 4)] * 5 + [(3,)] * 7 + [(200, 200)], 0, 1.0)]
    plan = unitwise.UnitPlan(grads)
    (segment,) = plan.segments
    groups = [g for chunk in segment.chunks for g in chunk.groups]
    stacks = {g.g_stack.untyped_storage().data_ptr() for g in groups if g.g_stack is not None}
    assert len(stacks) == 1  # weights and gradients of both groups share one scratch buffer
    (buffer,) = {g.g_stack.untyped_storage().nbytes() for g in groups if g.g_stack is not None}
    assert buffer == 5 * 8 * 4 * 4  # the largest stack (float32), not the lone 200 x 200 tensor
    alone = unitwise.UnitPlan([p.grad for p in random_params([(200, 200)] * 2, 0, 1.0)])
    assert all(g.g_stack is None for c in alone.segments[0].chunks for g in c.groups)


EMPTY_SHAPES = [(0, 10), (0, 10), (10, 0), (0,), (0,), (2, 0, 3, 3)]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_gradients_add_nothing_to_any_norm(norm_type: float) -> None:
    # torch's clip_grad_norm_ refuses the inf-norm of an empty tensor; ours counts it as 0,
    # so the reference is torch on the non-empty tensors alone (stacked and lone ones both)
    shapes = [*EMPTY_SHAPES, (8, 5), (8, 5), (8,), (200, 200)]
    ours = random_params(shapes, seed=6, scale=1.0)
    ref = [p for p in clone(ours) if p.numel()]
    norm = by_global_norm_(ours, max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type))
    for x, y in zip([p for p in ours if p.numel()], ref, strict=True):
        torch.testing.assert_close(x.grad, y.grad)
    ours, ref = clone(ours), [p for p in clone(ours) if p.numel()]
    by_norm_(ours, max_norm=0.5, norm_type=norm_type)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], 0.5, norm_type=norm_type)
    for x, y in zip([p for p in ours if p.numel()], ref, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


def test_all_empty_gradients_have_norm_zero() -> None:
    for norm_type in NORM_TYPES:
        params = random_params(EMPTY_SHAPES, seed=0, scale=1.0)
        assert torch.equal(by_global_norm_(params, 1.0, norm_type=norm_type), torch.zeros(()))
        assert torch.equal(by_norm_(params, 1.0, norm_type=norm_type), torch.zeros(()))


def test_agc_on_empty_tensors_matches_a_row_loop_on_the_others() -> None:
    params = random_params([*EMPTY_SHAPES, (6, 4), (6, 4), (6,)], seed=7, scale=0.5)
    expected = [reference_agc(p.detach(), p.grad, 0.02, 1e-3) for p in params]
    agc_(params, clipping=0.02)
    for p, e in zip(params, expected, strict=True):
        assert p.grad.shape == e.shape
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "clip",
    [
        lambda ps: by_global_norm_(ps, 1.0),
        lambda ps: by_norm_(ps, 1.0),
        lambda ps: by_value_(ps, 1.0),
        lambda ps: agc_(ps),
    ],
    ids=["by_global_norm_", "by_norm_", "by_value_", "agc_"],
)
def test_a_sparse_gradient_is_clipped_as_its_dense_equal_or_is_a_clear_error(clip: object) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    model(torch.tensor([1, 3, 3])).sum().backward()
    dense = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for d, p in zip(dense, model.parameters(), strict=True):
        d.grad = p.grad.to_dense().clone()
    try:
        clip(model.parameters())  # type: ignore[operator]  # a generator, as users pass it
    except SecateursError as e:
        assert "params[0].grad: got a torch.sparse_coo" in str(e), e
        return
    clip(dense)  # type: ignore[operator]
    for p, d in zip(model.parameters(), dense, strict=True):
        torch.testing.assert_close(p.grad.to_dense(), d.grad)
