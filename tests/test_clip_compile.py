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
