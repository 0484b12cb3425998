"""One-shot pruning, layer by layer, against hand computations and least-squares solves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError


def _data(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (a random mixing of independent features), so the update matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=g) @ torch.randn(columns, columns, generator=g)


def _linear(inputs: int, outputs: int, seed: int = 1, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, outputs, bias=bias)


def test_wanda_keeps_the_largest_weight_times_input_norm_in_every_row() -> None:
    layer = _linear(8, 4)
    w = layer.weight.detach().clone()
    x = _data(40, 8)
    prune.oneshot(layer, [x[:20], x[20:]], method="wanda", sparsity=0.5)
    norms = [sum(float(x[t, j]) ** 2 for t in range(40)) ** 0.5 for j in range(8)]
    for r in range(4):
        score = [abs(float(w[r, j])) * norms[j] for j in range(8)]
        kept = sorted(range(8), key=lambda j: score[j])[4:]
        expected = [float(w[r, j]) if j in kept else 0.0 for j in range(8)]
        assert layer.weight[r].tolist() == pytest.approx(expected, abs=0)


def test_wanda_per_layer_compares_all_rows_together() -> None:
    layer = _linear(8, 4)
    w = layer.weight.detach().clone()
    x = _data(40, 8)
    prune.oneshot(layer, [x], method="wanda", sparsity=0.25, group="layer")
    score = w.abs() * x.square().sum(0).sqrt()
    threshold = score.flatten().sort().values[7]  # 8 of 32 pruned
    assert torch.equal(layer.weight == 0, score <= threshold)
    assert not torch.equal((layer.weight == 0).sum(1), torch.full((4,), 2))  # rows differ


def test_sparsegpt_pruning_one_column_is_the_closed_form_obs_update() -> None:
    layer = _linear(6, 3)
    with torch.no_grad():
        layer.weight[:, 0] = torch.tensor([1e-3, -2e-3, 1.5e-3])  # the column that goes
    w = layer.weight.detach().double().clone()
    x = _data(64, 6)
    result = prune.oneshot(layer, [x], method="sparsegpt", sparsity=1 / 6, group="row", damping=0.01)
    h = x.double().T @ x.double()
    h_damped = h + 0.01 * h.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    hinv = torch.linalg.inv(h_damped)
    # OBS (Hassibi & Stork): removing weight q moves the others by -w_q / [H^-1]_qq * H^-1[q, :]
    expected = w - (w[:, :1] / hinv[0, 0]) * hinv[0:1, :]
    assert torch.all(layer.weight[:, 0] == 0)
    torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-4, atol=1e-6)
    assert result.layers[0].damping == 0.01 and result.layers[0].damping_attempts == 1


def test_sparsegpt_error_lies_between_the_least_squares_floor_and_no_update() -> None:
    layer = _linear(16, 8)
    w = layer.weight.detach().clone()
    x = _data(256, 16)
    result = prune.oneshot(layer, [x[:128], x[128:]], method="sparsegpt", sparsity=0.5)
    pruned = layer.weight.detach()
    keep = pruned != 0
    dense_out = x @ w.T
    floor = no_update = ours = 0.0
    for r in range(8):
        kept = keep[r].nonzero().flatten()
        solution = torch.linalg.lstsq(x[:, kept].double(), dense_out[:, r : r + 1].double()).solution
        floor += float((x[:, kept].double() @ solution - dense_out[:, r : r + 1].double()).square().sum())
        no_update += float((x @ (w[r] * keep[r]) - dense_out[:, r]).square().sum())
        ours += float((x @ pruned[r] - dense_out[:, r]).square().sum())
    assert floor * (1 - 1e-4) <= ours < no_update
    assert ours < 0.75 * no_update  # the update does real work on correlated inputs
    reported = result.layers[0].error
    assert reported == pytest.approx((ours / float(dense_out.square().sum())) ** 0.5, rel=1e-3)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "activation"])
@pytest.mark.parametrize(("pattern", "block_size"), [("2:4", 128), ("4:8", 128), ("2:4", 6)])
def test_n_m_holds_in_every_group_of_a_linear(method: str, pattern: str, block_size: int) -> None:
    n, m = map(int, pattern.split(":"))
    layer = _linear(48, 10)
    prune.oneshot(layer, [_data(96, 48)], method=method, pattern=pattern, block_size=block_size)
    groups = (layer.weight != 0).reshape(10, 48 // m, m).sum(-1)
    assert torch.equal(groups, torch.full_like(groups, n))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_n_m_runs_along_input_channels_of_a_convolution(method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)  # 6 channels: a full group of 4 and a short one of 2
    prune.oneshot(conv, [torch.randn(2, 6, 8, 8)], method=method, pattern="2:4")
    kept = conv.weight.detach().movedim(1, -1) != 0  # (out, kh, kw, in)
    assert torch.all(kept[..., :4].sum(-1) == 2)
    assert torch.all(kept[..., 4:].sum(-1) == 2)  # a short group keeps at most N: both


def test_conv_inputs_by_unfold_give_the_convolution() -> None:
    from secateurs.prune.calibration.stats import input_rows, weight_matrix

    torch.manual_seed(0)
    for conv, x in [
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 9, 9)),
        (nn.Conv2d(3, 5, (3, 2), padding="same", padding_mode="reflect", dilation=2), torch.randn(2, 3, 9, 9)),
        (nn.Conv1d(4, 6, 5, stride=2, padding=2), torch.randn(3, 4, 20)),
    ]:
        rows = input_rows(conv, x)
        out = conv(x)
        flat = out.movedim(1, -1).reshape(-1, out.shape[1])
        torch.testing.assert_close(rows @ weight_matrix(conv).T + conv.bias, flat, rtol=1e-4, atol=1e-5)


def test_a_rank_deficient_hessian_grows_the_damping_and_says_so() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-3, 4, (32, 1), generator=g).float()
    x = torch.cat([a, a, torch.randint(-3, 4, (32, 2), generator=g).float()], 1)  # column 1 = column 0
    h = x.T @ x
    assert int(torch.linalg.matrix_rank(h.double())) == 3
    layer = _linear(4, 3)
    result = prune.oneshot(layer, [x], method="sparsegpt", sparsity=0.5, damping=0.0)
    row = result.layers[0]
    assert row.damping_attempts > 1 and row.damping > 0.0
    assert result.damping_grown == [row]
    assert "tries" in result.to_markdown()
    assert torch.isfinite(layer.weight).all() and row.error is not None and row.error < 1.0
    # with the dampening asked for by default, nothing grows
    again = prune.oneshot(_linear(4, 3), [x], method="sparsegpt", sparsity=0.5)
    assert again.layers[0].damping_attempts == 1 and again.damping_grown == []


def test_dead_inputs_zero_their_weights_and_do_not_break_the_inverse() -> None:
    x = _data(64, 8)
    x[:, 3] = 0
    layer = _linear(8, 4)
    result = prune.oneshot(layer, [x], method="sparsegpt", sparsity=0.25)
    assert torch.all(layer.weight[:, 3] == 0)
    assert result.layers[0].damping_attempts == 1 and torch.isfinite(layer.weight).all()


@pytest.mark.parametrize("damping", [0.01, 0.0])
def test_the_in_place_inverse_is_torchs_out_of_place_chain_bit_for_bit(damping: float) -> None:
    from secateurs.prune.calibration.sparsegpt import inverse_hessian

    x = _data(24, 40)  # 24 rows for 40 columns: rank-deficient, so damping 0 must grow
    x[:, 5] = 0  # a dead input
    h = x.T @ x
    before = h.clone()
    found = inverse_hessian(h, damping)
    assert torch.equal(h, before)  # the Hessian is left as it is
    reference = h.clone()
    reference[5, 5] = 1
    reference.diagonal().add_(found.damping * float(reference.diagonal().mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(reference)), upper=True)
    assert torch.equal(found.factor, upper)
    assert (found.attempts > 1) == (damping == 0.0)
    if damping:  # well conditioned: the factor is that of the inverse
        inverse = torch.linalg.inv(reference.double())
        assert torch.allclose((found.factor.T @ found.factor).double(), inverse, rtol=1e-3, atol=1e-4 * float(inverse.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparsegpt_on_cuda_factorises_in_place_and_prunes_as_on_the_cpu() -> None:
    from secateurs.prune.calibration.sparsegpt import inverse_hessian

    x = _data(96, 48)
    h = (x.T @ x).cuda()
    found = inverse_hessian(h, 0.01)
    reference = h.clone()
    reference.diagonal().add_(0.01 * float(reference.diagonal().mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(reference)), upper=True)
    assert found.factor.is_cuda and torch.allclose(found.factor, upper, rtol=1e-5, atol=1e-6)
    cpu, gpu = _linear(48, 16), _linear(48, 16).cuda()
    prune.oneshot(cpu, [x], method="sparsegpt", sparsity=0.5)
    prune.oneshot(gpu, [x.cuda()], method="sparsegpt", sparsity=0.5)
    assert torch.allclose(gpu.weight.cpu(), cpu.weight, rtol=1e-3, atol=1e-4)
    assert float((gpu.weight == 0).float().mean()) == 0.5


def test_magnitude_needs_no_data_and_others_do() -> None:
    layer = _linear(8, 4)
    w = layer.weight.detach().clone()
    result = prune.oneshot(layer, method="magnitude", sparsity=0.5, group="layer")
    assert torch.equal(layer.weight == 0, w.abs() <= w.abs().flatten().sort().values[15])
    assert result.layers[0].error is None
    with pytest.raises(SecateursError, match=r"^calibration: got None; .*'wanda' needs data"):
        prune.oneshot(_linear(8, 4), method="wanda", sparsity=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"^sparsity: got 1.0; allowed: a number in \[0, 1\)"),
        ({"sparsity": 0.5, "method": "obs"}, r"^method: got 'obs'; allowed: magnitude, wanda, sparsegpt"),
        ({"pattern": "4:4"}, r"^pattern: got '4:4'"),
        ({"pattern": "2:4", "sparsity": 0.7}, r"^sparsity: got 0.7; allowed: 0.5 \(set by pattern 2:4\)"),
        ({"sparsity": 0.5, "group": "global"}, r"^group: got 'global'; allowed: row or layer for sparsegpt"),
        ({"sparsity": 0.5, "owl": True, "pattern": "2:4"}, r"^sparsity|^owl"),
        ({"sparsity": 0.5, "damping": -1}, r"^damping: got -1"),
        ({"sparsity": 0.5, "sparsities": {"nothing": 0.2}}, r"^sparsities: got 'nothing'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(SecateursError, match=message):
        prune.oneshot(_linear(8, 4), [_data(16, 8)], **{"method": "sparsegpt", **kwargs})


def test_a_model_with_nothing_to_prune_is_one_error() -> None:
    with pytest.raises(SecateursError, match=r"^model: got Sequential with no prunable weight"):
        prune.oneshot(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], method="wanda", sparsity=0.5)


def test_global_group_ranks_all_layers_together() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(10)
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    result = prune.oneshot(model, method="magnitude", sparsity=0.5, group="global")
    allw = torch.cat([w.abs().flatten() for w in weights])
    threshold = allw.sort().values[47]
    for layer, w in zip((model[0], model[2]), weights, strict=True):
        assert torch.equal(layer.weight == 0, w.abs() <= threshold)
    assert result.sparsity == pytest.approx(0.5)


def test_owl_sparsities_follow_the_published_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        model[2].weight[:, :3] *= 8  # more outliers in the middle layer
    x = torch.randn(64, 16)
    inputs, h = [], x
    with torch.no_grad():
        for i in (0, 2, 4):
            inputs.append(h)
            h = model[i](h).relu()
    ratios = []
    for i, layer_in in zip((0, 2, 4), inputs, strict=True):
        score = model[i].weight.abs() * layer_in.square().sum(0).sqrt()
        ratios.append(float((score > 3 * score.mean()).float().mean()))
    lo, hi = min(ratios), max(ratios)
    keep = [(r - lo) / (hi - lo) * 0.2 for r in ratios]  # luuyin/OWL: spread 2 * lambda ...
    keep = [k - sum(keep) / 3 + 0.5 for k in keep]  # ... centred on 1 - sparsity
    result = prune.oneshot(model, [x], method="wanda", sparsity=0.5, owl=prune.OWL(m=3, lam=0.1))
    targets = [layer.target for layer in result.layers]
    assert targets == pytest.approx([1 - k for k in keep])
    assert targets[1] == min(targets) and max(targets) - min(targets) == pytest.approx(0.2)
    for layer in result.layers:
        assert layer.sparsity == pytest.approx(layer.target, abs=1 / 16)


def test_owl_keeps_the_target_for_the_whole_model_when_layers_differ_in_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight[:, :3] *= 8  # more outliers in the middle layer
    result = prune.oneshot(model, [torch.randn(128, 64)], method="wanda", sparsity=0.7, owl=prune.OWL(m=3, lam=0.1))
    targets = [layer.target for layer in result.layers]
    assert max(targets) - min(targets) == pytest.approx(0.2)  # the published spread
    weights = [model[i].weight for i in (0, 2, 4)]
    expected = sum(t * w.numel() for t, w in zip(targets, weights, strict=True)) / sum(w.numel() for w in weights)
    assert expected == pytest.approx(0.7)  # the small head does not stand in for the rest
    assert result.sparsity == pytest.approx(0.7, abs=1e-3)


def test_sparsities_by_hand_take_precedence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    result = prune.oneshot(model, [torch.randn(32, 16)], method="wanda", sparsity=0.5, sparsities={"2": 0.25})
    assert [round(layer.sparsity, 3) for layer in result.layers] == [0.5, 0.25]


@pytest.mark.parametrize("name", ["", ".stats", ".capture", ".wanda", ".sparsegpt", ".owl", ".oneshot", ".results"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module("secateurs.prune.calibration" + name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
