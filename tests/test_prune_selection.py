"""Selection: the k lowest over a pool equal a stable sort of all scores; N:M blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.errors import SecateursError
from secateurs.prune import Pruner, selection
from secateurs.prune.selection import lowest, nm_keep, parse_pattern, prune_lowest_


def reference_keep(scores: list[torch.Tensor], k: int) -> torch.Tensor:
    """Keep-mask from sorting every score together (stable: earlier weights go first on ties)."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep


def select(scores: list[torch.Tensor], k: int, **kwargs: object) -> torch.Tensor:
    masks = [torch.ones(s.shape, dtype=torch.bool) for s in scores]
    prune_lowest_(masks, lambda i, a, b: scores[i].reshape(-1)[a:b], k, **kwargs)
    return torch.cat([m.reshape(-1) for m in masks])


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    ties=st.booleans(),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_global_selection_equals_sorting_all_scores(shapes, dtype, ties, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [
        (torch.randint(0, 4, s, generator=g).to(dtype) if ties else torch.randn(s, generator=g).to(dtype))
        for s in shapes
    ]
    k = int(fraction * sum(s.numel() for s in scores))
    assert torch.equal(select(scores, k, signed=True), reference_keep(scores, k))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12), cols=st.integers(1, 40), ties=st.booleans(), fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16), whole=st.booleans(),
)
def test_lowest_is_a_stable_sorts_first_k(rows, cols, ties, fraction, seed, whole):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, cols), generator=g).float() if ties else torch.randn(rows, cols, generator=g)
    if whole:
        k = int(fraction * scores.numel())
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[scores.reshape(-1).argsort(stable=True)[:k]] = True
        assert torch.equal(lowest(scores, k), expected.view(rows, cols))
    else:
        k = int(fraction * cols)
        expected = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], True)
        assert torch.equal(lowest(scores, k, dim=1), expected)
        assert torch.equal(lowest(scores.T, k, dim=0), expected.T)


def test_selection_of_non_negative_scores_needs_no_sign_handling():
    scores = [torch.rand(7, 9), torch.rand(40)]
    assert torch.equal(select(scores, 30, signed=False), reference_keep(scores, 30))


def test_chunked_selection_equals_one_chunk(monkeypatch):
    scores = [torch.randint(0, 3, (13, 5)).float(), torch.randn(40).abs(), torch.randn(3, 3, 3).abs()]
    expected = reference_keep(scores, 50)
    monkeypatch.setattr(selection, "CHUNK", 7)
    assert torch.equal(select(scores, 50), expected)


def test_special_values_sort_like_floats():
    scores = [torch.tensor([0.5, -0.0, 0.0, float("-inf"), float("inf"), -2.0, 1e-30, -1e-30])]
    keep = select(scores, 5, signed=True)  # -inf, -2, -1e-30, -0.0, 0.0
    assert keep.tolist() == [True, False, False, False, True, False, True, False]


def test_already_pruned_weights_stay_pruned_and_count_towards_k():
    scores = [torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])]
    masks = [torch.tensor([False, True, True, True, True, True])]  # the best weight is pruned
    pruned = prune_lowest_(masks, lambda i, a, b: scores[i][a:b], 3)
    assert pruned == 3
    assert masks[0].tolist() == [False, True, True, True, False, False]


def test_k_below_the_already_pruned_count_keeps_them_all_pruned():
    masks = [torch.tensor([False, False, True, True])]
    assert prune_lowest_(masks, lambda i, a, b: torch.arange(4.0)[a:b], 1) == 2
    assert masks[0].tolist() == [False, False, True, True]


def test_k_zero_keeps_everything():
    masks = [torch.zeros(5, dtype=torch.bool)]
    assert prune_lowest_(masks, lambda i, a, b: torch.ones(5)[a:b], 0, keep_pruned=False) == 0
    assert masks[0].all()


def test_global_pruner_matches_sorting_all_magnitudes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Conv1d(30, 10, 1), nn.Flatten(), nn.Linear(10, 3))
    weights = [model[0].weight, model[2].weight, model[4].weight]
    expected = reference_keep([w.detach().abs() for w in weights], int(0.7 * sum(w.numel() for w in weights) + 0.5))
    pruner = Pruner(model, sparsity=0.7)
    pruner.step()
    got = torch.cat([m.reshape(-1) for m in pruner.masks.values()])
    assert torch.equal(got, expected)


def test_layer_scope_prunes_each_weight_to_the_sparsity_by_its_own_ranking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    expected = [reference_keep([m.weight.detach().abs()], round(0.6 * m.weight.numel())) for m in model]
    pruner = Pruner(model, sparsity=0.6, scope="layer")
    pruner.step()
    for mask, keep in zip(pruner.masks.values(), expected, strict=True):
        assert torch.equal(mask.reshape(-1), keep)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    extra=st.integers(1, 6),
    rows=st.integers(1, 6),
    cols=st.integers(1, 20),
    kernel=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_nm_holds_in_every_block(n, extra, rows, cols, kernel, seed):
    m = n + extra
    shape = (rows, cols) if kernel == 0 else (rows, cols, kernel, kernel)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = nm_keep(scores, n, m)
    blocks = keep.movedim(1, -1).reshape(-1, cols)
    pad = (-cols) % m
    padded = torch.cat([blocks, torch.zeros(blocks.shape[0], pad, dtype=torch.bool)], 1)
    per_block = padded.reshape(blocks.shape[0], -1, m).sum(-1)
    assert int(per_block.max()) <= n
    # the kept ones are the block's largest scores
    moved = scores.movedim(1, -1).reshape(-1, cols)
    for r in range(moved.shape[0]):
        for start in range(0, cols, m):
            block, kept = moved[r, start : start + m], blocks[r, start : start + m]
            assert int(kept.sum()) == min(n, block.numel())
            if kept.any() and (~kept).any():
                assert block[kept].min() >= block[~kept].max()


def test_pruner_with_2_4_pattern_has_at_most_two_of_every_four_along_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 12))
    pruner = Pruner(model, sparsity=0.5, pattern="2:4")
    assert pruner.step() == pytest.approx(0.5)
    for name, mask in pruner.masks.items():
        blocks = mask.movedim(1, -1).reshape(-1, 4)
        assert int(blocks.sum(-1).max()) <= 2, name


def test_pattern_plus_higher_sparsity_prunes_further_within_the_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    pruner = Pruner(model, sparsity=0.8, pattern="2:4")
    assert pruner.step() == pytest.approx(0.8, abs=1e-3)
    for mask in pruner.masks.values():
        assert int(mask.reshape(-1, 4).sum(-1).max()) <= 2


def test_pattern_sets_a_floor_on_sparsity():
    model = nn.Linear(16, 16)
    pruner = Pruner(model, sparsity=0.2, pattern="1:4")
    assert pruner.step() == pytest.approx(0.75)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "a:b", (3, 2), "2:4:8", 24])
def test_bad_pattern_names_the_field(pattern):
    with pytest.raises(SecateursError, match="pattern"):
        parse_pattern(pattern)
    with pytest.raises(SecateursError, match="pattern"):
        Pruner(nn.Linear(4, 4), sparsity=0.5, pattern=pattern)


def test_pattern_parses_with_spaces():
    assert parse_pattern(" 2 : 4 ") == (2, 4)
    assert parse_pattern((1, 8)) == (1, 8)


def test_selection_runs_on_one_intra_op_thread_and_restores_the_setting() -> None:
    # many small parallel kernels wait for busy cores (bench/prune.py --busy 2): one thread
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))

    def score_fn(i: int, a: int, b: int) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return scores[a:b]

    try:
        masks = [torch.ones(1000, dtype=torch.bool)]
        assert prune_lowest_(masks, score_fn, 300) == 300
        assert set(seen) == {1}
        assert torch.get_num_threads() == 2
        assert torch.equal(masks[0], scores >= scores.sort().values[300])
    finally:
        torch.set_num_threads(before)
