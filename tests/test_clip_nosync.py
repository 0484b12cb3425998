"""No host sync in the clipping hot path: run it on the ``meta`` device, where any read raises.

A tensor on ``meta`` has a shape and a dtype but no data, so ``.item()``, ``bool()``,
``float()`` or a copy to the CPU raise. Running a rule or a wrapped optimizer step there proves
it never reads a device value on the host (on a GPU that read would be a sync).
"""

from __future__ import annotations

import pytest
import torch

from secateurs.clip import METHODS, Chain, GlobalNorm, build, by_global_norm_, by_norm_, wrap
from secateurs.prune.masks import mask_grads_

REQUIRED = {
    "value": {"clip_value": 0.1},
    "norm": {"max_norm": 1.0},
    "global_norm": {"max_norm": 1.0},
}
META = torch.device("meta")


def meta_params() -> list[torch.nn.Parameter]:
    shapes = [(16, 8), (16,), (4, 3, 3, 3), (4,), (70000,)] + [(8, 4), (8,)] * 3  # some stacked
    shapes += [(0, 8), (0, 8), (0,)]  # empty ones take their own path for inf-norms
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, device=META))
        p.grad = torch.empty(s, device=META)
        params.append(p)
    return params


def test_reading_a_meta_tensor_raises() -> None:
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(torch.empty((), device=META) > 0)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_rule_runs_without_reading_the_device(method: str) -> None:
    rule = build(method, **REQUIRED.get(method, {}))
    params = meta_params()
    for _ in range(4):  # warm-up branches and steady state
        stats = rule(params)
    assert stats.norm_before.device == META and stats.clipped.device == META


def test_chain_runs_without_reading_the_device() -> None:
    rule = Chain(build("agc"), build("zclip", warmup_steps=2), GlobalNorm(1.0))
    for _ in range(3):
        rule(meta_params())


def test_by_global_norm_and_by_norm_do_not_read_off_the_cpu() -> None:
    params = meta_params()
    assert by_global_norm_(params, 1.0).device == META
    assert by_norm_(params, 1.0).device == META


@pytest.mark.parametrize("method", ["none", "global_norm", "autoclip", "zclip", "agc", "adagc"])
def test_wrapped_sgd_skip_step_runs_without_reading_the_device(method: str) -> None:
    params = meta_params()
    opt = wrap(
        torch.optim.SGD(params, lr=0.1), build(method, **REQUIRED.get(method, {})), nonfinite="skip"
    )
    for _ in range(3):
        opt.step()
    assert opt.log.total_steps == 3


def test_wrapped_sgd_with_momentum_skip_step_runs_without_reading_the_device() -> None:
    # The step that creates optimizer state reads one flag (a skipped step must not leave new
    # state behind); every later step must not. Give the optimizer its state up front.
    params = meta_params()
    inner = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in params:
        inner.state[p]["momentum_buffer"] = torch.empty_like(p)
    opt = wrap(inner, GlobalNorm(1.0), nonfinite="skip")
    for _ in range(3):
        opt.step()
    assert all(inner.state[p]["momentum_buffer"].device == META for p in params)


def test_wrapped_step_with_a_masking_pre_clip_hook_runs_without_reading_the_device() -> None:
    # what Pruner.attach(wrapped) registers: pruned gradients to zero before the rule
    params = meta_params()
    masks = [torch.empty(p.shape, dtype=torch.bool, device=META) for p in params]
    opt = wrap(torch.optim.SGD(params, lr=0.1), GlobalNorm(1.0), nonfinite="skip")
    opt.register_pre_clip_hook(lambda o: mask_grads_(params, masks))
    for _ in range(3):
        opt.step()
    assert opt.log.total_steps == 3


OPTIMIZERS_WITH_STATE = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
}


@pytest.mark.parametrize("name", OPTIMIZERS_WITH_STATE)
def test_wrapped_optimizer_skip_steps_from_the_first_one_without_reading_the_device(name: str) -> None:
    # The first step creates the optimizer state, which a skipped step must not leave behind:
    # a structural change no select can undo. The guard starts a non-blocking copy of the flag
    # and decides at the next step (nothing to copy on meta), so no step reads the device; Adam
    # keeps its step counters on the CPU beside meta parameters, restored the same way.
    params = meta_params()
    inner = OPTIMIZERS_WITH_STATE[name](params)
    opt = wrap(inner, GlobalNorm(1.0), nonfinite="skip")
    for _ in range(3):
        opt.step()
        assert opt.state is inner.state  # reading it settles what the step left: still no read
    assert opt.log.total_steps == 3
    assert all(inner.state[p] for p in params)
    assert all(v.device == META for p in params for k, v in inner.state[p].items() if k != "step")


def cpu_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def cpu_backward(model: torch.nn.Module, step: int, *, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    if nan:
        next(model.parameters()).grad[0, 0] = float("nan")


@pytest.mark.parametrize("name", OPTIMIZERS_WITH_STATE)
def test_a_skipped_first_step_is_undone_from_its_flag_read_at_the_next_step(name: str) -> None:
    model, reference = cpu_model(), cpu_model()
    inner = OPTIMIZERS_WITH_STATE[name](list(model.parameters()))
    opt = wrap(inner, GlobalNorm(1.0), nonfinite="skip")
    cpu_backward(model, 0, nan=True)
    opt.step()
    # the step did not read its flag: the state it created is still there, undecided
    assert len(inner.state) == 4
    opt.zero_grad()
    cpu_backward(model, 1)
    opt.step()  # reads the first step's flag, drops its state, then steps as if first
    ref_opt = OPTIMIZERS_WITH_STATE[name](list(reference.parameters()))
    cpu_backward(reference, 1)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        assert inner.state[p].keys() == ref_opt.state[q].keys()
        for key, value in inner.state[p].items():
            assert torch.equal(value, ref_opt.state[q][key]), key
    assert opt.log.skipped() == [True, False]


def test_reading_the_state_after_a_skipped_first_step_shows_none() -> None:
    model = cpu_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = wrap(inner, GlobalNorm(1.0), nonfinite="skip")
    cpu_backward(model, 0, nan=True)
    opt.step()
    assert len(opt.state) == 0  # read through the wrapper, which settles first
    assert opt.state_dict()["state"] == {}
