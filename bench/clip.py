"""Benchmark: secateurs.clip against torch.nn.utils.clip_grad_norm_ and against each other.

Two gradient sets: 62 tensors / 24M elements shaped like ResNet-50's convolutions (plus a
small head and some norm vectors), and 2000 small tensors (a deep MLP's weights and biases).
Every contender runs once per round, in a rotating order, on gradients restored from a master
copy just before it runs (so clipping never compounds and caches start alike); the reported
ratio is the median over rounds of the per-round ratio, which cancels slow drifts in machine
load. Targets are from issue 3.

On a machine shared with other jobs, two intra-op threads make wall time depend on how often a
parallel kernel waits for its second thread to be scheduled (a cost per kernel, not per byte);
``--threads 1 --clock cpu`` measures the kernels themselves and gives steadier ratios.

``--device cuda`` runs the same on a GPU, timing each call from a synchronised start to a
synchronised end (the no-clip target is for the CPU only: off the CPU the factor is always
applied, since skipping it would need a host read of the norm). There it also times, without
a target, the paths the GPU defaults replace: AutoClip and ZClip with their bookkeeping run
eagerly instead of replayed as a CUDA graph, and AGC both tensor by tensor and as one Triton
kernel (the default picks one by the tensors' shapes; see ``secateurs.clip._graphs`` and
``secateurs.clip._agc_fused``).

``--compile [BACKEND]`` also times a whole wrapped step (``wrap(SGD, rule, nonfinite="skip")``:
the rule, the skip guard and the update) compiled with ``torch.compile(step, fullgraph=True,
backend=BACKEND)`` (default ``inductor``) against the same step run eagerly, for GlobalNorm,
AutoClip, ZClip and AGC, without a target (compiling happens in the warm-up rounds).

    PYTHONPATH=src python bench/clip.py [--rounds 25] [--threads 2] [--clock wall|cpu]
                                        [--device cpu|cuda] [--launches] [--compile [BACKEND]]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from secateurs.clip import AGC, AutoClip, GlobalNorm, Rule, ZClip, by_global_norm_, wrap


def resnet_like_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's 53 conv weights, a 256-way head, and 7 norm vectors: 62 tensors, 24.0M."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    width_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, width_in, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                shapes.append((width * 4, width_in, 1, 1))
            width_in = width * 4
    shapes += [(256, 2048), (256,)]
    shapes += [(64,), (64,), (256,), (256,), (512,), (512,), (2048,)]
    return shapes


def small_shapes() -> list[tuple[int, ...]]:
    """1000 (64, 48) weights and 1000 (64,) biases: 2000 tensors, 3.1M elements."""
    return [(64, 48) if i % 2 == 0 else (64,) for i in range(2000)]


class GradSet:
    """Parameters with gradients, and a master copy to restore the gradients from."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.params = []
        for s in shapes:
            p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(device))
            p.grad = (torch.randn(s, generator=g) * 1e-3).to(device)
            self.params.append(p)
        self.master = [p.grad.clone() for p in self.params]
        self.norm = float(torch.nn.utils.get_total_norm(self.master))
        self.numel = sum(p.numel() for p in self.params)

    def reset(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.master)


def torch_clip(max_norm: float) -> Callable[[list[torch.nn.Parameter]], object]:
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)


def ours_clip(max_norm: float) -> Callable[[list[torch.nn.Parameter]], object]:
    return lambda ps: by_global_norm_(ps, max_norm)


def wrapped_step(gs: GradSet, rule: Rule, backend: str | None) -> Callable[[object], object]:
    """One wrapped SGD step (lr 0, so the parameters stay put from round to round), compiled
    with ``fullgraph=True`` by ``backend`` or eager (None)."""
    opt = wrap(torch.optim.SGD(gs.params, lr=0.0), rule, nonfinite="skip")
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend, fullgraph=True)
    return lambda _: step()


def run(
    gs: GradSet,
    contenders: dict[str, Callable],
    rounds: int,
    clock: Callable[[], float],
    warmup: int = 3,
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds + warmup):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gs.reset()
            start = clock()
            contenders[name](gs.params)
            elapsed = clock() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
)


def launches(gs: GradSet, contenders: dict[str, Callable]) -> dict[str, int]:
    """Kernel launches, graph launches and async copies one call of each contender makes,
    counted by torch's profiler (the host-side API calls; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name, fn in contenders.items():
        gs.reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(gs.params)
            torch.cuda.synchronize()
        counts[name] = sum(e.count for e in prof.key_averages() if e.key in LAUNCHES)
    return counts


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, steadier than wall time on a machine shared with other jobs",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--launches", action="store_true", help="cuda: also count each contender's launches"
    )
    parser.add_argument(
        "--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="also time compiled (fullgraph) wrapped steps against eager ones",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    where = "CPU"
    if args.device == "cuda":
        where = torch.cuda.get_device_name()

        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{args.clock} clock, {where}"
    )
    print(
        f"{'set':<10} {'contender':<28} {'vs':<28} {'median ms':>9} {'vs ms':>8} {'ratio':>6}  target"
    )

    no_clip_target = 0.6 if args.device == "cpu" else 1.0
    results = []
    for label, shapes in (("resnet62", resnet_like_shapes()), ("small2000", small_shapes())):
        gs = GradSet(shapes, device=args.device)
        clip_to = 0.5 * gs.norm  # clipping case: the norm is twice the threshold
        no_clip = 2.0 * gs.norm  # non-clipping case
        # stateful rules start from a short history so their thresholds are in the clipping range
        autoclip, zclip = AutoClip(), ZClip(warmup_steps=5)
        eager_autoclip = AutoClip(cuda_graph=False)
        eager_zclip = ZClip(warmup_steps=5, cuda_graph=False)
        for rule in (autoclip, zclip, eager_autoclip, eager_zclip):
            for _ in range(6):
                gs.reset()
                rule(gs.params)
        extra: dict[str, Callable] = {}
        if args.device == "cuda":
            extra = {
                "AutoClip (eager update)": eager_autoclip,
                "ZClip (eager update)": eager_zclip,
                "AGC (per tensor)": AGC(fused=False),
                "AGC (kernel)": AGC(fused=True),
            }
        contenders = {
            "torch clip_grad_norm_ (clip)": torch_clip(clip_to),
            "by_global_norm_ (clip)": ours_clip(clip_to),
            "torch clip_grad_norm_ (no clip)": torch_clip(no_clip),
            "by_global_norm_ (no clip)": ours_clip(no_clip),
            "GlobalNorm": GlobalNorm(clip_to),
            "AutoClip": autoclip,
            "ZClip": zclip,
            "AGC": AGC(),
            **extra,
        }
        steps: dict[str, tuple[str, str]] = {}
        if args.compile:
            # every wrapped optimizer compiles the same code object (ClippedOptimizer.step) under
            # its own guards, two graphs each (first step, then steady state): 8 per gradient set
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
            for name, make in (("GlobalNorm", lambda c=clip_to: GlobalNorm(c)), ("AutoClip", AutoClip),
                               ("ZClip", lambda: ZClip(warmup_steps=5)), ("AGC", AGC)):  # fmt: skip
                eager_name, compiled_name = f"{name} step (eager)", f"{name} step (compiled)"
                contenders[eager_name] = wrapped_step(gs, make(), None)
                contenders[compiled_name] = wrapped_step(gs, make(), args.compile)
                steps[name] = (compiled_name, eager_name)
        times = run(gs, contenders, args.rounds, clock)
        if args.launches and args.device == "cuda":
            for name, n in launches(gs, contenders).items():
                print(f"{label:<10} {name:<28} {n:5d} launches (kernels, graphs, async copies)")
        comparisons = [
            ("by_global_norm_ (clip)", "torch clip_grad_norm_ (clip)", 1.0),
            # the skipped scaling pass is a CPU-only saving (see the module docstring)
            ("by_global_norm_ (no clip)", "torch clip_grad_norm_ (no clip)", no_clip_target),
            ("AutoClip", "GlobalNorm", 1.15),
            ("ZClip", "GlobalNorm", 1.15),
            ("AGC", "GlobalNorm", 1.45),
        ]
        print(f"-- {label}: {len(gs.params)} tensors, {gs.numel / 1e6:.1f}M elements")
        for a, b, target in comparisons:
            ratio = paired_ratio(times, a, b)
            ok = "ok" if ratio <= target else "MISSED"
            ta, tb = statistics.median(times[a]) * 1e3, statistics.median(times[b]) * 1e3
            print(
                f"{label:<10} {a:<28} {b:<28} {ta:9.2f} {tb:8.2f} {ratio:6.2f}  <= {target:.2f} {ok}"
            )
            results.append(ratio <= target)
        for a in extra:
            ratio = paired_ratio(times, a, "GlobalNorm")
            ta, tb = statistics.median(times[a]) * 1e3, statistics.median(times["GlobalNorm"]) * 1e3
            print(f"{label:<10} {a:<28} {'GlobalNorm':<28} {ta:9.2f} {tb:8.2f} {ratio:6.2f}  (no target)")
        for compiled_name, eager_name in steps.values():
            ratio = paired_ratio(times, compiled_name, eager_name)
            ta, tb = statistics.median(times[compiled_name]) * 1e3, statistics.median(times[eager_name]) * 1e3
            print(f"{label:<10} {compiled_name:<28} {eager_name:<28} {ta:9.2f} {tb:8.2f} {ratio:6.2f}  "
                  f"(no target; {args.compile})")  # fmt: skip
    missed = results.count(False)
    print(
        f"{len(results) - missed}/{len(results)} targets met"
        + ("" if not missed else f", {missed} missed")
    )
    assert all(math.isfinite(t) for ts in times.values() for t in ts)


if __name__ == "__main__":
    main()
