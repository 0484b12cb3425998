"""Structured pruning on Torch-Pruning's own model list: torchvision models, random init, ratio 0.5.

Each row prunes one torchvision model with ``prune.structured(model, x, sparsity=0.5)`` and,
beside it, with Torch-Pruning 1.6.1's ``MagnitudePruner`` (``MagnitudeImportance(p=2)``,
``pruning_ratio=0.5``, the classifier in ``ignored_layers``; for ViT its example's ``num_heads``
and the ``hidden_dim`` fix-up after pruning; Swin's ``qkv`` layers with their ``num_heads``).
Both results are counted by the same counter (``tp.utils.count_ops_and_params``) and checked
against the dense model's output shape. Each (model, library) pair runs in its own process with a
time limit, so a hang or a crash is one cell of the table, not the end of the run.

    PYTHONPATH=src .venv/bin/python bench/structured_zoo.py [--models resnet18,vit_b_16] [--timeout 300] [--repeats 3]

Times are wall seconds of the pruning call alone (model construction and the MAC count excluded;
secateurs' time includes its own deep copy of the model, Torch-Pruning prunes in place), the
median of ``--repeats`` runs of each side, alternating which side goes first; the CPU-time ratio
(``time.process_time`` of the call, both threads) moves less with the load. The 1-minute load
average before and after each row is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODELS = (
    "resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
    "efficientnet_v2_s", "densenet121", "googlenet", "inception_v3", "mnasnet1_0", "vgg16_bn",
    "convnext_tiny", "alexnet", "resnext50_32x4d", "regnet_y_400mf", "vit_b_16", "squeezenet1_1",
    "shufflenet_v2_x1_0", "swin_t",
)
CNNS = set(MODELS) - {"vit_b_16", "swin_t"}
HERE = Path(__file__).resolve().parent


def build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def classifier(model):
    """The last layer producing the 1000 class scores (Linear, or SqueezeNet's 1x1 convolution)."""
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and getattr(m, "out_features", getattr(m, "out_channels", None)) == 1000]
    return layers[-1:]


def prune_secateurs(model, x):
    from secateurs import prune

    return prune.structured(model, x, sparsity=0.5)


def prune_torch_pruning(model, x):
    import torch_pruning as tp
    import torchvision
    from torch import nn

    num_heads, unwrapped = {}, None
    if isinstance(model, torchvision.models.VisionTransformer):
        num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        unwrapped = [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
    if isinstance(model, torchvision.models.SwinTransformer):
        num_heads = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
        ignored_layers=classifier(model), num_heads=num_heads, unwrapped_parameters=unwrapped,
    )
    pruner.step()
    if isinstance(model, torchvision.models.VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # the example's hand fix-up
    return model


def worker(name: str, side: str) -> dict:
    import torch
    import torch_pruning as tp

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = tuple(model(x).shape)
    macs, params = tp.utils.count_ops_and_params(model, x)
    fn = prune_secateurs if side == "secateurs" else prune_torch_pruning
    if side == "secateurs":
        import secateurs.prune  # noqa: F401  (imported before the clock starts, as torch_pruning is above)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        small = fn(model, x)
    except Exception as exc:  # a cell of the table
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "seconds": time.perf_counter() - start}
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    try:
        with torch.no_grad():
            shape = tuple(small.eval()(x).shape)
        pmacs, pparams = tp.utils.count_ops_and_params(small, x)
    except Exception as exc:
        return {"ok": False, "error": f"pruned model fails: {type(exc).__name__}: {str(exc)[:300]}", "seconds": seconds}
    return {"ok": shape == expected, "shape": list(shape), "expected": list(expected), "seconds": seconds, "cpu": cpu,
            "macs": pmacs / macs, "params": pparams / params, "dense_macs": macs,
            **({} if shape == expected else {"error": f"output shape {shape}, dense {expected}"})}


def run(name: str, side: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, side], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"process failed: {tail[:300]}"}
    return json.loads(lines[-1])


def repeated(name: str, timeout: float, repeats: int) -> tuple[dict, dict]:
    """Both sides ``repeats`` times, alternating which goes first; each side's median wall and
    CPU seconds (a busy machine moves single runs by 2x either way)."""
    runs: dict[str, list[dict]] = {"secateurs": [], "torch_pruning": []}
    for r in range(repeats):
        for side in (("secateurs", "torch_pruning") if r % 2 == 0 else ("torch_pruning", "secateurs")):
            runs[side].append(run(name, side, timeout))
    out = []
    for side in ("secateurs", "torch_pruning"):
        done = runs[side]
        if not all(d.get("ok") for d in done):
            out.append(next(d for d in done if not d.get("ok")))
            continue
        out.append({**done[0], "seconds": statistics.median(d["seconds"] for d in done),
                    "cpu": statistics.median(d["cpu"] for d in done), "all": [round(d["seconds"], 1) for d in done]})
    return out[0], out[1]


def cell(r: dict) -> str:
    if not r.get("ok"):
        return f"**fails**: {r.get('error', '?')}"
    runs = f" (runs {', '.join(map(str, r['all']))})" if len(r.get("all", ())) > 1 else ""
    return f"ok, MACs {r['macs']:.3f}x, params {r['params']:.3f}x, {r['seconds']:.1f} s{runs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per (model, library) process")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; medians are compared")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    print("| model | secateurs | Torch-Pruning 1.6.1 | time ratio (wall) | CPU-time ratio | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    failures = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        load = os.getloadavg()[0]
        ours, theirs = repeated(name, args.timeout, args.repeats)
        both = ours.get("ok") and theirs.get("ok")
        ratio = f"{ours['seconds'] / theirs['seconds']:.2f}x" if both else "-"
        cpu = f"{ours['cpu'] / theirs['cpu']:.2f}x" if both else "-"
        print(f"| {name} | {cell(ours)} | {cell(theirs)} | {ratio} | {cpu} | {load:.1f}-{os.getloadavg()[0]:.1f} |", flush=True)
        if not ours.get("ok") or (name in CNNS and ours["macs"] > 0.35):
            failures.append(name)
    print(f"\nsecateurs rows not ok (or CNN MACs > 0.35x): {', '.join(failures) or 'none'}")


if __name__ == "__main__":
    main()
