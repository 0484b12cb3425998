"""Each criterion equals a hand computation on a tiny layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.prune import CRITERIA, Pruner, make_criterion
from secateurs.prune.criteria import MagnitudeCriterion, SynFlowCriterion

W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -0.5]])
X1, T1 = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[0.5, -1.0]])
X2, T2 = torch.tensor([[3.0, 0.0, 2.0], [-1.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
BATCHES = [(X1, T1), (X2, T2)]


def sum_squares(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


def tiny() -> nn.Linear:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


def hand_grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dL/dW of sum((W x - t)^2) over the rows of x: 2 (W x - t) x^T."""
    return 2 * (x @ W.T - t).T @ x


def scores_of(criterion: str, model: nn.Module | None = None, **options: object) -> torch.Tensor:
    model = model or tiny()
    pruner = Pruner(model, sparsity=0.5, criterion=make_criterion(criterion, **options))
    pruner.score(BATCHES, sum_squares)
    return pruner.scores()["weight"]


def test_registry_names_every_criterion():
    assert tuple(CRITERIA) == ("magnitude", "gradient", "activation", "taylor", "movement", "random", "synflow")


def test_magnitude_l1_is_absolute_value():
    assert torch.equal(scores_of("magnitude"), W.abs())


def test_magnitude_l2_is_square():
    assert torch.equal(scores_of("magnitude", p=2), W**2)


def test_gradient_is_mean_absolute_gradient_over_batches():
    expected = (hand_grad(X1, T1).abs() + hand_grad(X2, T2).abs()) / 2
    assert torch.allclose(scores_of("gradient"), expected)


def test_taylor_is_absolute_weight_times_mean_gradient():
    expected = (W * (hand_grad(X1, T1) + hand_grad(X2, T2)) / 2).abs()
    assert torch.allclose(scores_of("taylor"), expected)


def test_movement_from_scored_batches_is_minus_sum_of_weight_times_gradient():
    expected = -(W * hand_grad(X1, T1) + W * hand_grad(X2, T2))
    assert torch.allclose(scores_of("movement"), expected)


def test_movement_accumulates_over_optimizer_steps():
    layer = tiny()
    pruner = Pruner(layer, sparsity=0.5, criterion="movement")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    pruner.attach(optimizer)
    expected = torch.zeros_like(W)
    for x, t in BATCHES * 2:
        optimizer.zero_grad()
        sum_squares(layer(x), t).backward()
        expected -= layer.weight.detach() * layer.weight.grad
        optimizer.step()
    assert torch.allclose(pruner.scores()["weight"], expected)
    assert pruner.criterion.count == 4


def test_activation_is_weight_times_mean_absolute_input():
    mean_abs_input = torch.cat([X1, X2]).abs().mean(0)  # [5/3, 1, 4/3]
    assert torch.allclose(scores_of("activation"), W.abs() * mean_abs_input)


def test_activation_needs_no_loss_function():
    pruner = Pruner(tiny(), sparsity=0.5, criterion="activation")
    assert pruner.score([(X1, None)]) == 1
    assert torch.allclose(pruner.scores()["weight"], W.abs() * X1.abs())


def conv_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Mean |input| each conv weight multiplies, by looping over every output position."""
    weight = conv.weight.detach()
    out_c, cpg, kh, kw = weight.shape
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    xp = nn.functional.pad(x, (pw, pw, ph, ph))
    oh = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    mean = torch.zeros_like(weight)
    for o in range(out_c):
        group = o // (out_c // conv.groups)
        for c in range(cpg):
            for i in range(kh):
                for j in range(kw):
                    total = 0.0
                    for b in range(x.shape[0]):
                        for y in range(oh):
                            for z in range(ow):
                                total += abs(float(xp[b, group * cpg + c, y * sh + i * dh, z * sw + j * dw]))
                    mean[o, c, i, j] = total / (x.shape[0] * oh * ow)
    return weight.abs() * mean


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(padding=1), dict(stride=2, padding=1, groups=2), dict(dilation=2, padding=2)],
)
def test_activation_of_a_convolution_counts_padding_stride_groups(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 2 if "dilation" not in kwargs else 3, **kwargs)
    x = torch.randn(2, 4, 5, 5)
    pruner = Pruner(conv, sparsity=0.5, criterion="activation")
    pruner.score([(x[:1], None), (x[1:], None)])
    assert torch.allclose(pruner.scores()["weight"], conv_reference(conv, x), atol=1e-5)


def test_activation_of_a_two_layer_bidirectional_gru_uses_each_layers_inputs():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    pruner = Pruner(gru, sparsity=0.5, criterion="activation")
    pruner.score([(x, None)])
    got = pruner.scores()

    layer_input = x
    for layer in range(2):
        outputs = []
        for direction, sfx in enumerate(["", "_reverse"]):
            single = nn.GRU(layer_input.shape[-1], 4, batch_first=True)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(single, f"{name}_l0").data.copy_(getattr(gru, f"{name}_l{layer}{sfx}"))
            seq = layer_input.flip(1) if direction else layer_input
            out, _ = single(seq)
            previous = torch.cat([torch.zeros(2, 1, 4), out[:, :-1]], 1)
            ih, hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
            expected_ih = getattr(gru, ih).detach().abs() * seq.abs().mean((0, 1))
            expected_hh = getattr(gru, hh).detach().abs() * previous.abs().mean((0, 1))
            assert torch.allclose(got[ih], expected_ih, atol=1e-6), ih
            assert torch.allclose(got[hh], expected_hh, atol=1e-6), hh
            outputs.append(out.flip(1) if direction else out)
        layer_input = torch.cat(outputs, -1)


def test_activation_of_multihead_attention_uses_query_key_value_and_attention_output():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, query, key):  # a tuple of inputs is passed as positional arguments
            return self.attn(query, key, key)[0]

    pruner = Pruner(Cross(), sparsity=0.5, criterion="activation")
    pruner.score([((q, k), None)])
    got = pruner.scores()

    w = attn.in_proj_weight.detach()
    means = torch.cat([q.abs().mean((0, 1)), k.abs().mean((0, 1)), k.abs().mean((0, 1))]).view(3, 1, 4)
    expected_in = (w.abs().view(3, 4, 4) * means).view(12, 4)
    assert torch.allclose(got["attn.in_proj_weight"], expected_in, atol=1e-6)

    b = attn.in_proj_bias.detach()
    qp, kp, vp = q @ w[:4].T + b[:4], k @ w[4:8].T + b[4:8], k @ w[8:].T + b[8:]
    heads = []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        weights = torch.softmax(qp[..., sl] @ kp[..., sl].transpose(1, 2) / math.sqrt(2), -1)
        heads.append(weights @ vp[..., sl])
    before_projection = torch.cat(heads, -1)
    expected_out = attn.out_proj.weight.detach().abs() * before_projection.abs().mean((0, 1))
    assert torch.allclose(got["attn.out_proj.weight"], expected_out, atol=1e-5)


def test_synflow_on_two_linear_layers_is_weight_times_path_sums():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    w1, w2 = model[0].weight.detach().abs(), model[1].weight.detach().abs()
    pruner = Pruner(model, sparsity=0.5, criterion=SynFlowCriterion(iterations=1, input_shape=(3,)))
    got = pruner.scores()
    # R = 1^T |W2| |W1| 1, so dR/dW1[i, j] = sum_k |W2[k, i]| and dR/dW2[k, i] = sum_j |W1[i, j]|
    assert torch.allclose(got["0.weight"].float(), w1 * w2.sum(0)[:, None])
    assert torch.allclose(got["1.weight"].float(), w2 * w1.sum(1)[None, :])
    assert got["0.weight"].dtype == torch.float64


def test_synflow_takes_input_shape_from_scored_batches():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    pruner = Pruner(model, sparsity=0.5, criterion=SynFlowCriterion(iterations=3))
    assert not pruner.requires_data
    with pytest.raises(SecateursError, match="synflow"):
        pruner.step()
    pruner.score(BATCHES)
    assert pruner.step() == pytest.approx(0.5, abs=0.03)


def test_synflow_iterations_reach_the_target_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = Pruner(model, sparsity=0.9, criterion=SynFlowCriterion(iterations=10, input_shape=(8,)))
    assert pruner.step() == pytest.approx(round(0.9 * 192) / 192)


def test_random_is_reproducible_from_seed_and_differs_between_seeds_and_steps():
    def draw(seed: int) -> torch.Tensor:
        return Pruner(nn.Linear(30, 30), sparsity=0.5, criterion=make_criterion("random", seed=seed)).scores()["weight"]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    scores = draw(3)
    assert float(scores.min()) >= 0.0 and float(scores.max()) < 1.0
    assert abs(float(scores.mean()) - 0.5) < 0.05


def test_random_prunes_every_layer_to_about_the_global_sparsity():
    model = nn.Sequential(*[nn.Linear(100, 100) for _ in range(4)])
    pruner = Pruner(model, sparsity=0.8, criterion=make_criterion("random", seed=0))
    pruner.step()
    for fraction in pruner.layer_sparsity().values():
        assert fraction == pytest.approx(0.8, abs=0.03)


def test_magnitude_is_the_default_and_accepts_an_instance():
    assert isinstance(Pruner(tiny(), sparsity=0.5).criterion, MagnitudeCriterion)
    criterion = MagnitudeCriterion(p=2)
    assert Pruner(tiny(), sparsity=0.5, criterion=criterion).criterion is criterion


@pytest.mark.parametrize("name", ["gradient", "taylor", "activation", "movement"])
def test_data_criterion_stepped_without_score_names_score(name):
    pruner = Pruner(tiny(), sparsity=0.5, criterion=name)
    assert pruner.requires_data
    with pytest.raises(SecateursError, match=r"criterion: got .*score\(batches, loss_fn\)"):
        pruner.step()


@pytest.mark.parametrize("name", ["magnitude", "random", "synflow"])
def test_data_free_criteria_do_not_require_data(name):
    assert not Pruner(tiny(), sparsity=0.5, criterion=name).requires_data


def test_unknown_criterion_lists_the_allowed_ones():
    with pytest.raises(SecateursError, match="criterion: got 'nonsense'; allowed: magnitude, gradient, activation"):
        Pruner(tiny(), sparsity=0.5, criterion="nonsense")


def test_bad_criterion_options_name_the_argument():
    with pytest.raises(SecateursError, match=r"^p: got 3; allowed: 1 \(L1\) or 2 \(L2\)"):
        make_criterion("magnitude", p=3)
    with pytest.raises(SecateursError, match=r"^bogus: got 1; allowed: parameters of criterion 'magnitude': p$"):
        make_criterion("magnitude", bogus=1)
    with pytest.raises(SecateursError, match=r"^iterations: got 0; allowed: an integer >= 1"):
        make_criterion("synflow", iterations=0)


def test_gradient_criterion_without_loss_function_names_loss_fn():
    pruner = Pruner(tiny(), sparsity=0.5, criterion="gradient")
    with pytest.raises(SecateursError, match="loss_fn"):
        pruner.score(BATCHES, None)


def test_scoring_empty_or_malformed_batches_names_batches():
    pruner = Pruner(tiny(), sparsity=0.5, criterion="gradient")
    with pytest.raises(SecateursError, match="batches"):
        pruner.score([], sum_squares)
    with pytest.raises(SecateursError, match="batches"):
        pruner.score([X1], sum_squares)


def test_score_leaves_grad_untouched_and_honours_max_batches():
    layer = tiny()
    pruner = Pruner(layer, sparsity=0.5, criterion="gradient")
    assert pruner.score(BATCHES * 3, sum_squares, max_batches=2) == 2
    assert layer.weight.grad is None
    assert torch.allclose(pruner.scores()["weight"], (hand_grad(X1, T1).abs() + hand_grad(X2, T2).abs()) / 2)


def test_activation_on_a_module_that_never_runs_names_it():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["used"](x)

    pruner = Pruner(Wrapper(), sparsity=0.5, criterion="activation")
    with pytest.raises(SecateursError, match=r"m\.unused\.weight never ran"):
        pruner.score([(X1, None)])


@pytest.mark.parametrize("name", ["gradient", "taylor", "activation"])
def test_scores_are_dropped_after_a_step_so_stale_statistics_never_mix_in(name):
    pruner = Pruner(tiny(), sparsity=0.5, criterion=name)
    pruner.score(BATCHES, sum_squares)
    pruner.step(0.3)
    with pytest.raises(SecateursError, match="score"):
        pruner.step(0.5)
    pruner.score([(X2, T2)], sum_squares)
    assert pruner.criterion.count == 1
    pruner.step(0.5)


def test_movement_keeps_accumulating_across_steps():
    pruner = Pruner(tiny(), sparsity=0.5, criterion="movement")
    pruner.score(BATCHES, sum_squares)
    pruner.step(0.3)
    assert pruner.criterion.count == 2
    pruner.step(0.5)
