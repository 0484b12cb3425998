"""Property: pruned weights stay exactly +0.0 through 200 optimizer steps, whatever the optimizer.

Random small models (MLP, CNN, GRU, attention), random sparsity and criterion, dense warm-up
steps first (so momentum and Adam moments are non-zero when the masks arrive), and a second,
higher prune half way through. Each of the pruner's two protections is checked on its own:

* zeroed gradients and optimizer state: an element-wise optimizer (SGD, Adam, AdamW, RMSprop)
  must leave a pruned weight at zero by itself, which a step post-hook registered before the
  pruner's sees before the pruner re-zeroes anything;
* re-zeroing after the step: an optimizer that mixes coordinates (``Mixing``) moves pruned
  weights whatever the state, so only the re-zeroing keeps them at zero.

Then: a pruner attached to a clipping wrapper zeroes the pruned gradients before the rule
measures them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.clip import GlobalNorm, wrap
from secateurs.prune import Pruner, make_criterion


class Mixing(torch.optim.Optimizer):
    """SGD with a weight decay towards the mean of each tensor, ``g + 0.01 * mean(w)``: zero
    gradient and state at a weight do not keep it still (like Shampoo or Muon, it mixes
    coordinates). Through the weights, not the gradients: a heavily pruned random net can have
    no gradient left at all."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + 0.01 * p.mean(), alpha=-group["lr"])


ELEMENTWISE = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=1e-3),
}
OPTIMIZERS = {**ELEMENTWISE, "mixing": lambda p: Mixing(p, lr=0.05)}


class Sequence(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(3, width)
        if kind == "gru":
            self.mix = nn.GRU(width, width, batch_first=True)
        else:
            self.mix = nn.MultiheadAttention(width, 1, batch_first=True)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(x.shape[0], 4, 3))
        h = self.mix(h)[0] if self.kind == "gru" else self.mix(h, h, h)[0]
        return self.head(h.mean(1))


def build(kind: str, width: int, depth: int) -> nn.Module:
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        size = 12
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.Tanh()]
            size = width
        return nn.Sequential(*layers, nn.Linear(size, 2))
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (3, 2, 2)), nn.Conv2d(3, width, 2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(width * 9, 2),
        )
    return Sequence(kind, width)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["mlp", "cnn", "gru", "attention"]),
    width=st.integers(2, 8),
    depth=st.integers(1, 3),
    sparsity=st.floats(0.1, 0.8),
    criterion=st.sampled_from(["magnitude", "random"]),
    warmup=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_masks_never_revive_over_200_steps(optimizer_name, kind, width, depth, sparsity, criterion, warmup, seed):
    torch.manual_seed(seed)
    model = build(kind, width, depth)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    x, y = torch.randn(16, 12), torch.randn(16, 2)

    def train_step() -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y).backward()
        optimizer.step()

    for _ in range(warmup):
        train_step()
    pruner = Pruner(model, sparsity=min(sparsity + 0.15, 0.95), criterion=make_criterion(criterion, seed=seed) if criterion == "random" else criterion)
    moved: list[tuple[int, str]] = []  # pruned weights the optimizer itself moved

    def before_re_zeroing(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for target in pruner.targets:
            if target.param.detach()[~pruner.masks[target.name]].any():
                moved.append((len(moved), target.name))

    optimizer.register_step_post_hook(before_re_zeroing)  # runs before the pruner's post-hook
    pruner.attach(optimizer)
    pruner.step(sparsity)
    for step in range(200):
        if step == 100:
            before = {k: m.clone() for k, m in pruner.masks.items()}
            pruner.step()
            assert all(not (pruner.masks[k] & ~m).any() for k, m in before.items())
        train_step()
        for target in pruner.targets:
            pruned = target.param.detach()[~pruner.masks[target.name]]
            assert torch.equal(pruned, torch.zeros_like(pruned)), (step, target.name)
            assert not torch.signbit(pruned).any(), (step, target.name)
    assert pruner.current_sparsity == pytest.approx(min(sparsity + 0.15, 0.95), abs=0.02)
    if optimizer_name in ELEMENTWISE:
        assert moved == []  # masked gradients and state alone kept them still
    else:
        assert moved  # the optimizer did move them: the re-zeroing above is what held


def test_optimizer_state_of_pruned_weights_is_zeroed():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 10)).square().sum().backward()
        optimizer.step()
    pruner = Pruner(model, sparsity=0.5)
    pruner.attach(optimizer)
    pruner.step()
    state = optimizer.state[model.weight]
    pruned = ~pruner.masks["weight"]
    assert float(state["exp_avg"][pruned].abs().sum()) == 0.0
    assert float(state["exp_avg_sq"][pruned].abs().sum()) == 0.0


def test_mask_grads_zeroes_pruned_gradients_for_clipping():
    model = nn.Linear(6, 6)
    pruner = Pruner(model, sparsity=0.5)
    pruner.step()
    model(torch.randn(3, 6)).sum().backward()
    pruner.mask_grads_()
    assert float(model.weight.grad[~pruner.masks["weight"]].abs().sum()) == 0.0


def test_model_converted_to_float64_after_pruning_still_applies_masks():
    model = nn.Linear(6, 6)
    pruner = Pruner(model, sparsity=0.5)
    pruner.step()
    model.double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    pruner.apply_()
    assert int((model.weight == 0).sum()) == 18


def masked_and_full_norms(model: nn.Module, pruner: Pruner) -> tuple[float, float]:
    """The gradient norm with pruned weights' gradients zeroed by hand, and without."""
    masks = pruner.masks
    grads = [
        p.grad * masks[name] if name in masks else p.grad for name, p in model.named_parameters()
    ]
    full = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    return torch.nn.utils.get_total_norm(grads).item(), full.item()


def test_pruner_attached_to_a_wrapper_masks_gradients_before_the_rule_sees_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), GlobalNorm(0.5))
    pruner = Pruner(model, sparsity=0.5)
    pruner.attach(optimizer)
    pruner.step()
    x, y = torch.randn(16, 12), torch.randn(16, 2)
    for step in range(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x + 0.1 * step), y).backward()
        masked, full = masked_and_full_norms(model, pruner)
        optimizer.step()
        assert optimizer.log.norms()[-1] == pytest.approx(masked, rel=1e-6)
        assert masked < full
        for target in pruner.targets:
            pruned = target.param.detach()[~pruner.masks[target.name]]
            assert torch.equal(pruned, torch.zeros_like(pruned)), (step, target.name)
    assert pruner.current_sparsity == pytest.approx(0.5)


def test_finalize_removes_the_pre_clip_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = wrap(torch.optim.SGD(model.parameters(), lr=0.05), None)
    pruner = Pruner(model, sparsity=0.5)
    pruner.attach(optimizer)
    pruner.step()
    pruner.finalize()
    nn.functional.mse_loss(model(torch.randn(16, 12)), torch.randn(16, 2)).backward()
    _, full = masked_and_full_norms(model, pruner)
    optimizer.step()
    assert optimizer.log.norms() == [pytest.approx(full, rel=1e-6)]


def test_attaching_a_wrapper_and_its_inner_optimizer_counts_each_step_once():
    x, y = torch.randn(16, 12), torch.randn(16, 2)

    def movement_scores(attach_inner_too: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 2))
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        optimizer = wrap(inner, GlobalNorm(0.5))
        pruner = Pruner(model, sparsity=0.5, criterion="movement")
        if attach_inner_too:
            pruner.attach(inner)
        pruner.attach(optimizer)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        return pruner.scores()

    once, both = movement_scores(False), movement_scores(True)
    for name, score in once.items():
        assert score.abs().sum() > 0
        assert torch.equal(score, both[name]), name
