"""``torch.compile(wrapped.step, fullgraph=True)``: one graph per step for every rule and every
non-finite policy, equal to the eager step, a NaN step included.

``fullgraph=True`` turns any graph break into an error, so these tests fail on the first Python
construct Dynamo cannot trace (and on torch's own optimizer-step wrapper, which breaks the graph
on purpose: see ``secateurs.clip.wrap._inner_step``). The ``aot_eager`` backend checks the
traced graphs without a C++ compiler. The models are tiny: compiling is what costs here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from secateurs.clip import (
    AGC,
    NONFINITE,
    AdaGC,
    AutoClip,
    Chain,
    GlobalNorm,
    NonFiniteGradError,
    Norm,
    Rule,
    Value,
    ZClip,
    wrap,
)

pytestmark = pytest.mark.slow

RULES: dict[str, Callable[[], Rule | None]] = {
    "none": lambda: None,
    "value": lambda: Value(0.05),
    "norm": lambda: Norm(0.3),
    "global_norm": lambda: GlobalNorm(0.5),
    "agc": lambda: AGC(0.05),
    "autoclip": lambda: AutoClip(percentile=50),
    "zclip": lambda: ZClip(warmup_steps=2),
    "adagc": AdaGC,
    "chain": lambda: Chain(AGC(0.05), GlobalNorm(0.5)),
}
NAN_STEP = 3
STEPS = 10  # past the recompile limit (8), should each step recompile


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # one weight of 76800 elements: large enough for the CPU paths of large tensors
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 300), torch.nn.Tanh(), torch.nn.Linear(300, 2),
    )


def backward(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 5, generator=g) * 3, torch.randn(16, 2, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    if step == NAN_STEP:
        next(model.parameters()).grad[0, 0] = math.nan


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, step: Callable[[], object]) -> list[str]:
    """Train STEPS steps; what each step raised ('' for none)."""
    raised = []
    for i in range(STEPS):
        opt.zero_grad()
        backward(model, i)
        try:
            step()
            raised.append("")
        except NonFiniteGradError:
            raised.append("NonFiniteGradError")
        except RuntimeError as e:  # what the in-graph assertion raises
            raised.append("RuntimeError: non-finite" if "non-finite" in str(e) else str(e))
    return raised


@pytest.mark.parametrize("nonfinite", NONFINITE)
@pytest.mark.parametrize("rule", RULES)
def test_a_fullgraph_compiled_step_equals_the_eager_step(rule: str, nonfinite: str) -> None:
    torch._dynamo.reset()
    eager_model, compiled_model = make_model(), make_model()
    eager = wrap(torch.optim.SGD(eager_model.parameters(), lr=0.05), RULES[rule](), nonfinite=nonfinite)
    wrapped = wrap(torch.optim.SGD(compiled_model.parameters(), lr=0.05), RULES[rule](), nonfinite=nonfinite)
    compiled = torch.compile(wrapped.step, backend="aot_eager", fullgraph=True)

    eager_raised = run(eager_model, eager, eager.step)
    compiled_raised = run(compiled_model, wrapped, compiled)

    for p, q in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, equal_nan=True)
    nan_step = [i == NAN_STEP for i in range(STEPS)]
    if nonfinite == "error":
        # eager raises its own error; the graph cannot branch on the flag, so it asserts
        assert eager_raised == ["NonFiniteGradError" if s else "" for s in nan_step]
        assert compiled_raised == ["RuntimeError: non-finite" if s else "" for s in nan_step]
        assert all(torch.isfinite(p).all() for p in compiled_model.parameters())
        logged = [s for s in range(STEPS) if s != NAN_STEP]  # the raising step logs nothing
    else:
        assert compiled_raised == eager_raised == [""] * STEPS
        assert wrapped.log.skipped() == eager.log.skipped() == [s and nonfinite == "skip" for s in nan_step]
        logged = list(range(STEPS))
    assert wrapped.log.total_steps == eager.log.total_steps == len(logged)
    assert wrapped.log.norms() == pytest.approx(eager.log.norms(), rel=1e-5, nan_ok=True)
    assert wrapped.log.thresholds() == pytest.approx(eager.log.thresholds(), rel=1e-5, nan_ok=True)
    assert math.isnan(wrapped.log.norms()[NAN_STEP]) or nonfinite == "error"


def test_step_hooks_of_the_inner_optimizer_run_in_the_compiled_step() -> None:
    # the compiled path calls torch's step function without its wrapper, so it runs the
    # hooks itself (Pruner.attach keeps pruned weights at zero with them)
    torch._dynamo.reset()
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), GlobalNorm(0.5))
    weight = next(model.parameters())
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt.register_step_post_hook(lambda o, a, k: weight.data.mul_(keep))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(len(calls)))
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for i in range(2):
        opt.zero_grad()
        backward(model, i)
        compiled()
    assert torch.all(weight[~keep] == 0) and torch.all(weight[keep] != 0)
    assert calls == [0, 1]


# --- compiled from the very first step, which creates the optimizer state -------------------

OPTIMIZERS_WITH_STATE: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
}
FIRST_NANS = (0, 3)  # the state-creating step, and a later one
FIRST_STEPS = 5


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def train_from_the_first_step(name: str, compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """FIRST_STEPS skip-policy steps of a wrapped optimizer, NaN gradients at FIRST_NANS."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = small_model()
    opt = wrap(OPTIMIZERS_WITH_STATE[name](list(model.parameters())), GlobalNorm(0.5), nonfinite="skip")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
    for i in range(FIRST_STEPS):
        opt.zero_grad()
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if i in FIRST_NANS:
            model[0].weight.grad[1, 2] = math.nan
        step()
    return model, opt, counter.frame_count


@pytest.mark.parametrize("name", OPTIMIZERS_WITH_STATE)
def test_a_fullgraph_step_compiled_before_the_state_exists_equals_eager_under_skip(name: str) -> None:
    # The skipped first step created the state (Dynamo creates Adam's while tracing, SGD's
    # momentum buffer is a graph output); a graph cannot drop it, so it is dropped when the next
    # step is traced. SGD-momentum is the same computation as eager (bit for bit); compiled Adam
    # rounds differently from eager Adam (~1e-8) even without any NaN.
    eager_model, eager, _ = train_from_the_first_step(name, compiled=False)
    model, opt, graphs = train_from_the_first_step(name, compiled=True)
    assert opt.log.skipped() == eager.log.skipped() == [i in FIRST_NANS for i in range(FIRST_STEPS)]
    assert opt.log.norms() == pytest.approx(eager.log.norms(), rel=1e-5, nan_ok=True)
    exact = name == "sgd_momentum"
    for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.isfinite(q).all()
        if exact:
            assert torch.equal(q, p)
        else:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
        want, got = eager.state[p], opt.state[q]
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            # Adam's step counter counts the 3 steps taken, not the 2 skipped: the first one's
            # state was dropped, the later one's selected back
            torch.testing.assert_close(got[key].float(), value.float(), rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    if name != "sgd_momentum":
        assert all(float(opt.state[q]["step"]) == FIRST_STEPS - len(FIRST_NANS) for q in model.parameters())
    # a recompile after the state-creating step (where its flag is read), then one graph
    assert graphs <= 4, graphs
