"""Clipping quality on an exploding-gradient task: every rule of secateurs beside its reference.

The task is the adding problem (Hochreiter & Schmidhuber 1997): a sequence of ``--length``
(value, marker) pairs with values uniform in [0, 1) and two markers, one in each half; the
target is the sum of the two marked values. A plain tanh RNN (32 units) reads it and a linear
layer predicts the sum from the last state, trained with SGD + momentum 0.9 at lr 0.15 on
fresh batches of 64. At that learning rate the unclipped network diverges (NaN) on every seed.
Predicting the mean gives a test MSE of 1/6 = 0.167.

Each rule runs beside its reference implementation on the same seeds (same initial weights,
same batches):

* ``GlobalNorm(1.0)``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)``;
* ``AutoClip()`` (p = 10): ``autoclip.torch.QuantileClip(quantile=0.1, global_threshold=True)``;
* ``ZClip()``: ``zclip.ZClip()`` (1.0.0, its defaults);
* ``AGC()`` (0.01, eps 1e-3): timm's ``adaptive_clip_grad`` (its defaults), loaded from the
  installed timm's ``timm/utils/agc.py`` (``import timm`` would import torchvision);
* ``AdaGC()``: no package exists; the reference is a transcription of the authors' released
  ``AdaGC.clip_by_norm`` (github.com/lishuai-97/AdaGC, Megatron patch) with the same
  hyperparameters, ``max_norm`` (the warm-up's global clip) 1.0.

The table gives the final test MSE (1000 fixed sequences) as mean ± std over the seeds, how
many seeds learned (MSE under 0.05), and how far the secateurs mean is from the reference's in
units of the reference's std. ``ZClip(max_norm=None)`` is ZClip's default before its ceiling. Runs on
one thread; a few minutes in all.

    .venv/bin/python bench/clip_quality.py            # 5 seeds, 3000 steps
    .venv/bin/python bench/clip_quality.py --seeds 2 --steps 300   # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from secateurs.clip import AGC, AdaGC, AutoClip, GlobalNorm, ZClip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_rules import AuthorsAdaGC

HIDDEN = 32
BATCH = 64
LR = 0.15
MOMENTUM = 0.9
TEST_SIZE = 1000

Clipper = Callable[[torch.nn.Module], object]
"""Called on the model after backward(), before the optimizer step."""


def adding_problem(generator: torch.Generator, n: int, length: int) -> tuple[torch.Tensor, ...]:
    """``n`` sequences of (value, marker) and the sums of their two marked values."""
    x = torch.zeros(n, length, 2)
    x[:, :, 0] = torch.rand(n, length, generator=generator)
    rows = torch.arange(n)
    first = torch.randint(0, length // 2, (n,), generator=generator)
    second = torch.randint(length // 2, length, (n,), generator=generator)
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    return x, x[rows, first, 0] + x[rows, second, 0]


class AddingRNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.RNN(2, HIDDEN, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1]).squeeze(-1)


# -- references -----------------------------------------------------------------------------


def timm_adaptive_clip_grad() -> Callable[..., None] | None:
    """timm's ``adaptive_clip_grad`` from its file, or None without timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    module_spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def rule_clipper(make: Callable[[], object]) -> Callable[[], Clipper]:
    def build() -> Clipper:
        rule = make()
        return lambda model: rule(model.parameters())  # type: ignore[operator]

    return build


def reference_clippers() -> dict[str, Callable[[], Clipper] | None]:
    """A factory per rule for its reference (None where the package is missing)."""
    refs: dict[str, Callable[[], Clipper] | None] = {
        "global_norm": lambda: lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    }
    try:
        from autoclip.torch import QuantileClip
    except ImportError:
        refs["autoclip"] = None
    else:

        def autoclip_ref() -> Clipper:
            state: dict[str, object] = {}

            def clip(model: torch.nn.Module) -> None:
                if "clipper" not in state:  # it holds the parameters: made on first use
                    state["clipper"] = QuantileClip(
                        list(model.parameters()), quantile=0.1, history_length=1000, global_threshold=True
                    )
                state["clipper"].step()  # type: ignore[attr-defined]

            return clip

        refs["autoclip"] = autoclip_ref
    try:
        import zclip
    except ImportError:
        refs["zclip"] = refs["zclip_no_ceiling"] = None
    else:

        def zclip_ref(**kwargs: object) -> Callable[[], Clipper]:
            def build() -> Clipper:
                ref = zclip.ZClip(**kwargs)
                return lambda model: ref.step(model)

            return build

        refs["zclip"] = zclip_ref()
        refs["zclip_no_ceiling"] = zclip_ref(max_grad_norm=None)
    timm_agc = timm_adaptive_clip_grad()
    refs["agc"] = None if timm_agc is None else (lambda: lambda m: timm_agc(m.parameters()))

    def adagc_ref() -> Clipper:
        ref = AuthorsAdaGC(clip_ratio=1.05, beta=0.98, start_clip_steps=100, max_norm=1.0)
        return lambda model: ref(list(model.parameters()))

    refs["adagc"] = adagc_ref
    return refs


RULES: dict[str, tuple[str, Callable[[], Clipper], str]] = {
    "global_norm": (
        "`GlobalNorm(1.0)`",
        rule_clipper(lambda: GlobalNorm(1.0)),
        "`torch.nn.utils.clip_grad_norm_(params, 1.0)`",
    ),
    "autoclip": (
        "`AutoClip()`",
        rule_clipper(AutoClip),
        "`autoclip` 0.2.1 `QuantileClip(quantile=0.1, global_threshold=True)`",
    ),
    "zclip": ("`ZClip()`", rule_clipper(ZClip), "`zclip` 1.0.0 `ZClip()`"),
    "zclip_no_ceiling": (
        "`ZClip(max_norm=None)` (the old default)",
        rule_clipper(lambda: ZClip(max_norm=None)),
        "`zclip` 1.0.0 `ZClip(max_grad_norm=None)`",
    ),
    "agc": ("`AGC()`", rule_clipper(AGC), "timm 1.0.31 `adaptive_clip_grad` (0.01, eps 1e-3)"),
    "adagc": ("`AdaGC()`", rule_clipper(AdaGC), "the authors' `AdaGC.clip_by_norm`, transcribed"),
}
"""key: (row label, secateurs clipper factory, reference label)."""

LEARNED = 0.05
"""A run has learned when its test MSE is below this (predicting the mean gives 0.167)."""


# -- training -------------------------------------------------------------------------------


def train(clipper: Clipper | None, seed: int, steps: int, length: int) -> float:
    """Final test MSE of one run (NaN if training diverged)."""
    torch.manual_seed(seed)
    model = AddingRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    batches = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        x, y = adding_problem(batches, BATCH, length)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if clipper is not None:
            clipper(model)
        optimizer.step()
    x, y = adding_problem(torch.Generator().manual_seed(7), TEST_SIZE, length)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.2g}"


def summary(values: list[float]) -> tuple[str, str]:
    """Mean ± std of the finite results (and how many diverged); how many runs learned."""
    finite = [v for v in values if math.isfinite(v)]
    learned = f"{sum(v < LEARNED for v in finite)}/{len(values)}"
    if not finite:
        return "diverged", learned
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    text = f"{number(statistics.mean(finite))} ± {number(spread)}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text, learned


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def distance(ours: list[float], ref: list[float]) -> str:
    """(ours mean - reference mean) / reference std: below 1 is within one std."""
    if not all(map(math.isfinite, ours + ref)) or len(ref) < 2:
        return "n/a"
    spread = statistics.stdev(ref)
    gap = statistics.mean(ours) - statistics.mean(ref)
    if spread == 0:
        return "0 (identical)" if gap == 0 else "n/a"
    return f"{gap / spread:+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--length", type=int, default=10, help="sequence length")
    parser.add_argument("--rules", nargs="*", choices=list(RULES), default=list(RULES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    refs = reference_clippers()
    started = time.perf_counter()
    load = os.getloadavg()[0]

    def runs(build: Callable[[], Clipper] | None, label: str) -> list[float]:
        values = [train(None if build is None else build(), s, args.steps, args.length) for s in seeds]
        print(f"{label}: " + ", ".join(f"{v:.4f}" for v in values), file=sys.stderr, flush=True)
        return values

    unclipped = runs(None, "none")
    print(f"adding problem, length {args.length}, tanh RNN {HIDDEN}, SGD lr {LR} momentum {MOMENTUM}, "
          f"{args.steps} steps of {BATCH}, seeds 0-{args.seeds - 1}; final test MSE, mean ± std "
          "(predicting the mean: 0.167)\n", flush=True)  # fmt: skip
    print(row("rule", "secateurs", "learned", "reference", "reference's result", "learned",
              "(ours - ref) / ref std"))  # fmt: skip
    print(row("---", "---:", "---:", "---", "---:", "---:", "---:"))
    print(row("no clipping", *summary(unclipped), "", "", "", ""), flush=True)
    for key in args.rules:
        label, build, ref_label = RULES[key]
        ours = runs(build, key)
        ref_build = refs.get(key)
        if ref_build is None:
            print(row(label, *summary(ours), f"{ref_label}: not installed", "", "", ""))
            continue
        ref = runs(ref_build, f"{key} reference")
        print(row(label, *summary(ours), ref_label, *summary(ref), distance(ours, ref)), flush=True)
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s on 1 thread; 1-minute load {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
