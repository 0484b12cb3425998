"""SparseGPT's two options beyond the paper, against per-row least-squares solves: ``refine``
(the kept weights re-solved to the optimum for the fixed mask) and ``dense_targets`` (every
layer calibrated to reproduce the dense model's output from its pruned-model inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError


def _data(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=g) @ torch.randn(columns, columns, generator=g)


def _optimum(x: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, ridge: float = 0.0,
             around: torch.Tensor | None = None) -> torch.Tensor:
    """Row by row, ``argmin ||X_S w_S - target_r||^2 + ridge ||w_S - around_S||^2`` by lstsq in float64."""
    x, target = x.double(), target.double()
    out = torch.zeros(keep.shape, dtype=torch.float64)
    for r in range(keep.shape[0]):
        kept = keep[r].nonzero().flatten()
        a, b = x[:, kept], target[:, r]
        if ridge:
            assert around is not None
            a = torch.cat([a, ridge**0.5 * torch.eye(len(kept), dtype=torch.float64)])
            b = torch.cat([b, ridge**0.5 * around[r, kept].double()])
        out[r, kept] = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    return out


def test_refine_reaches_the_least_squares_optimum_for_sparsegpts_own_mask() -> None:
    torch.manual_seed(1)
    plain, refined = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)
    refined.load_state_dict(plain.state_dict())
    w = plain.weight.detach().clone()
    x = _data(256, 16)
    first = prune.oneshot(plain, [x], method="sparsegpt", pattern="2:4")
    second = prune.oneshot(refined, [x], method="sparsegpt", pattern="2:4", refine=50)
    keep = refined.weight.detach() != 0
    assert torch.equal(keep, plain.weight.detach() != 0)  # the mask is SparseGPT's
    ridge = 0.01 * float(x.double().square().sum(0).mean())  # the dampening SparseGPT adds to H
    expected = _optimum(x, x @ w.T, keep, ridge, w)
    torch.testing.assert_close(refined.weight.detach().double(), expected, rtol=1e-4, atol=1e-5)
    assert second.layers[0].error < 0.9 * first.layers[0].error  # SparseGPT's greedy update is not that optimum


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


@pytest.mark.parametrize("dense_targets", [True, False])
def test_dense_targets_fit_the_dense_output_from_the_pruned_inputs(dense_targets: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Layer(), _Layer())  # two blocks, the second reads the first
    dense = [m.linear.weight.detach().clone() for m in model]
    biases = [m.linear.bias.detach().clone() for m in model]
    x = _data(200, 12)
    x_dense = (x @ dense[0].T + biases[0]).relu()
    # damping 0 and enough iterations: every row is the exact least-squares solution on its mask
    result = prune.oneshot(model, [x[:100], x[100:]], method="sparsegpt", pattern="2:4", damping=0.0,
                           refine=100, dense_targets=dense_targets)
    assert [layer.damping_attempts for layer in result.layers] == [1, 1]
    pruned = [m.linear.weight.detach() for m in model]
    torch.testing.assert_close(pruned[0].double(), _optimum(x, x @ dense[0].T, pruned[0] != 0), rtol=1e-3, atol=1e-4)
    x_pruned = (x @ pruned[0].T + biases[0]).relu()
    wanted = x_dense if dense_targets else x_pruned  # the dense block's output, or the published target
    expected = _optimum(x_pruned, wanted @ dense[1].T, pruned[1] != 0)
    torch.testing.assert_close(pruned[1].double(), expected, rtol=1e-3, atol=1e-4)
    other = _optimum(x_pruned, (x_pruned if dense_targets else x_dense) @ dense[1].T, pruned[1] != 0)
    assert float((pruned[1].double() - other).abs().max()) > 1e-2  # the two targets really differ


def test_dense_targets_bring_the_output_closer_to_the_dense_models() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(_Layer() for _ in range(4)))
    x = _data(400, 12)
    with torch.no_grad():
        reference = model(x)
    errors = []
    for dense_targets in (False, True):
        copy = nn.Sequential(*(_Layer() for _ in range(4)))
        copy.load_state_dict(model.state_dict())
        prune.oneshot(copy, [x[:200]], method="sparsegpt", pattern="2:4", dense_targets=dense_targets)
        with torch.no_grad():
            errors.append(float((copy(x[200:]) - reference[200:]).norm() / reference[200:].norm()))
    assert errors[1] < errors[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "wanda", "refine": 5}, r"^method: got 'wanda'; allowed: sparsegpt with refine or dense_targets"),
    ({"method": "magnitude", "dense_targets": True}, r"^method: got 'magnitude'; allowed: sparsegpt"),
    ({"refine": -1}, r"^refine: got -1"),
    ({"dense_targets": 1}, r"^dense_targets: got 1; allowed: True or False"),
])
def test_bad_options_name_the_argument(kwargs: dict, message: str) -> None:
    options = {"method": "sparsegpt", "sparsity": 0.5, **kwargs}
    with pytest.raises(SecateursError, match=message):
        prune.oneshot(nn.Linear(8, 4), [_data(16, 8)], **options)
