"""Block-streamed one-shot pruning at depth: a random-init LLaMA-shaped model (hidden 1024, 16
heads, 4 KV heads, intermediate 2816, vocabulary 2048) saved as safetensors is pruned by
``prune.oneshot_streamed``, its blocks read from the file, pruned and written one at a time, the
others never in memory. Each depth runs in a fresh process; its peak resident memory
(``ru_maxrss``) should stay nearly flat as the depth doubles, where the weights double.

    .venv/bin/python bench/oneshot_scale.py                       # 6 and 12 layers, wanda 50%
    .venv/bin/python bench/oneshot_scale.py --method sparsegpt --layers 6 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 2816,
         "vocab_size": 2048, "max_position_embeddings": 256}
SAMPLES, SEQ_LEN, BATCH = 16, 128, 4


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(layers: int):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)


def write(layers: int, path: Path) -> int:
    """Save a random-init model of ``layers`` blocks; its weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(layers))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return sum(v.numel() * v.element_size() for v in state.values())


def prune_one(layers: int, path: Path, method: str) -> dict:
    import torch
    import transformers

    from secateurs import prune

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ_LEN), generator=g)}
            for _ in range(SAMPLES // BATCH)]
    with prune.calibration.empty_weights():
        model = transformers.LlamaForCausalLM(config(layers)).eval()
    before = peak_mb()
    out = path.with_name(f"pruned-{layers}.safetensors")
    started = time.perf_counter()
    result = prune.calibration.oneshot_streamed(model, path, out, data, method=method, sparsity=0.5, exclude=["lm_head"])
    seconds = time.perf_counter() - started
    hidden = SAMPLES * SEQ_LEN * SHAPE["hidden_size"] * 4
    return {"layers": layers, "method": method, "peak_rss_mb": peak_mb(), "peak_rss_mb_before": before,
            "prune_seconds": seconds, "sparsity": result.sparsity, "weights_mb": path.stat().st_size / 2**20,
            "one_block_activations_mb": hidden / 2**20, "out_mb": out.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[6, 12])
    parser.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt", "magnitude"))
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        kind, layers, path = args.cell
        if kind == "write":
            print(json.dumps({"weight_bytes": write(int(layers), Path(path))}))
        else:
            print(json.dumps(prune_one(int(layers), Path(path), args.method)))
        return
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    print("| layers | weights MB | peak RSS MB (process) | RSS before pruning MB | increase MB | prune s | sparsity |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            path = Path(tmp) / f"model-{layers}.safetensors"
            run = [sys.executable, __file__, "--method", args.method, "--cell"]
            subprocess.run([*run, "write", str(layers), str(path)], check=True, capture_output=True)
            done = subprocess.run([*run, "prune", str(layers), str(path)], check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {layers} | {row['weights_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['peak_rss_mb_before']:.0f} | "
                  f"{row['peak_rss_mb'] - row['peak_rss_mb_before']:.0f} | {row['prune_seconds']:.1f} | {row['sparsity']:.3f} |",
                  flush=True)
            path.unlink()
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
