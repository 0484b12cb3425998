"""Block-streamed one-shot pruning at depth: a random-init LLaMA-shaped model (hidden 1024, 16
heads, 4 KV heads, intermediate 2816, vocabulary 2048) saved as a Hugging Face folder
(config.json, model.safetensors and a word-level tokenizer) is pruned by
``prune.oneshot_streamed``, its blocks read from the file, pruned and written one at a time, the
others never in memory. Each depth runs in a fresh process; its peak resident memory
(``ru_maxrss``) should stay nearly flat as the depth doubles, where the weights double.

``--llmcompressor`` also prunes the same folder with llm-compressor's ``SparseGPTModifier``
(50%, lm_head excluded, sequential by ``LlamaDecoderLayer``) on the same token ids, in its own
venv and a fresh process per depth, and prints both peaks and their ratio; the comparison is
SparseGPT 50% on both sides.

    .venv/bin/python bench/oneshot_scale.py                       # 6 and 12 layers, wanda 50%
    .venv/bin/python bench/oneshot_scale.py --method sparsegpt --layers 6 12
    .venv/bin/python bench/oneshot_scale.py --layers 12 24 --llmcompressor --llmc-python /tmp/llmc-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oneshot import llmc_python, peak_rss_mb, rss_mb  # noqa: E402 (bench/oneshot.py: stdlib only at import)

SHAPE = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 2816,
         "vocab_size": 2048, "max_position_embeddings": 256}
SAMPLES, SEQ_LEN, BATCH = 16, 128, 4
BLOCK_LINEAR = re.compile(r"^model\.layers\.\d+\..+_proj\.weight$")
"""The Linear weights inside the decoder blocks (attention and MLP projections)."""


def config(layers: int):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)


def calibration_ids():  # type: ignore[no-untyped-def]
    """SAMPLES x SEQ_LEN random token ids, drawn in batches of BATCH (seed 1)."""
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ_LEN), generator=g)
                      for _ in range(SAMPLES // BATCH)])


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the vocabulary (``t0`` .. ``t2047``): the calibration data is
    already token ids, but llm-compressor loads the folder's processor whenever it is given data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SHAPE["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1",
                            bos_token="t2").save_pretrained(folder)


def write(layers: int, folder: Path) -> int:
    """Save a random-init model of ``layers`` blocks as a Hugging Face folder, and the calibration
    ids beside it (``calibration.safetensors``); its weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(layers))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    write_tokenizer(folder)
    save_file({"input_ids": calibration_ids()}, str(folder.parent / "calibration.safetensors"))
    return sum(v.numel() * v.element_size() for v in state.values())


def sparsity_of(tensors) -> dict:  # type: ignore[no-untyped-def]
    """Zero fraction of the block Linears' weights, and of lm_head's, from (name, tensor) pairs."""
    zeros = total = 0
    head = None
    for name, tensor in tensors:
        if BLOCK_LINEAR.match(name):
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
        elif name == "lm_head.weight":
            head = float((tensor == 0).float().mean())
    return {"block_sparsity": zeros / total, "lm_head_sparsity": head, "block_linear_weights": total}


def prune_one(layers: int, folder: Path, method: str) -> dict:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from secateurs import prune

    torch.manual_seed(0)
    ids = load_file(str(folder.parent / "calibration.safetensors"))["input_ids"]
    data = [{"input_ids": batch} for batch in ids.split(BATCH)]
    with prune.calibration.empty_weights():
        model = transformers.LlamaForCausalLM(config(layers)).eval()
    before, rss_before = peak_rss_mb(), rss_mb()
    path = folder / "model.safetensors"
    out = folder.parent / f"pruned-{layers}.safetensors"
    started = time.perf_counter()
    result = prune.calibration.oneshot_streamed(model, path, out, data, method=method, sparsity=0.5, exclude=["lm_head"])
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    with safe_open(str(out), "pt") as f:
        measured = sparsity_of((k, f.get_tensor(k)) for k in f.keys())  # noqa: SIM118 (a safe_open handle is not iterable)
    hidden = SAMPLES * SEQ_LEN * SHAPE["hidden_size"] * 4
    return {"layers": layers, "tool": "secateurs", "method": method, "peak_rss_mb": peak,
            "peak_rss_mb_before": before, "rss_mb_before": rss_before, "rss_mb_imports": rss_before,
            "prune_seconds": seconds, "sparsity": result.sparsity, **measured, "weights_mb": path.stat().st_size / 2**20,
            "one_block_activations_mb": hidden / 2**20, "out_mb": out.stat().st_size / 2**20}


def prune_llmc(layers: int, folder: Path) -> dict:
    """llm-compressor's SparseGPT 50% on the same folder and ids (run by its own venv's python)."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 (imported by the load below: counted with the imports)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = load_file(str(folder.parent / "calibration.safetensors"))["input_ids"]
    rss_imports = rss_mb()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # "re:.*lm_head", as llm-compressor's docs write it: with targets=["Linear"] it names the
    # head "lm_head." (trailing dot), so a plain ignore=["lm_head"] does not match and the head
    # is pruned (seen with llm-compressor 0.14: lm_head at 0.500 sparsity).
    recipe = SparseGPTModifier(sparsity=0.5, targets=["Linear"], ignore=["re:.*lm_head"])
    before, rss_before = peak_rss_mb(), rss_mb()
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=SAMPLES, max_seq_length=SEQ_LEN,
            sequential_targets=["LlamaDecoderLayer"])
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    with torch.no_grad():
        measured = sparsity_of(model.state_dict().items())
    return {"layers": layers, "tool": "llmcompressor", "method": "sparsegpt", "peak_rss_mb": peak,
            "peak_rss_mb_before": before, "rss_mb_before": rss_before, "rss_mb_imports": rss_imports,
            "prune_seconds": seconds, **measured}


def run_llmc(python: Path, layers: int, folder: Path, timeout: float) -> dict | None:
    """One llm-compressor depth in a fresh process (cwd: the scratch folder); None if it fails."""
    try:
        done = subprocess.run([str(python), __file__, "--cell", "llmc", str(layers), str(folder)], capture_output=True,
                              text=True, timeout=timeout, cwd=folder.parent)
    except subprocess.TimeoutExpired:
        print(f"llm-compressor, {layers} layers: over {timeout:.0f} s, stopped", file=sys.stderr, flush=True)
        return None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"llm-compressor, {layers} layers, failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr, flush=True)
    return None


def field(row: dict | None, key: str, spec: str) -> str:
    """``row[key]`` formatted by ``spec``, or n/a for a run that gave no row."""
    return "n/a" if row is None else format(row[key], spec)


def cell(command: list[str]) -> str:
    """Run one of our cells in a fresh process; its stdout (its stderr's tail on failure)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[2:])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[6, 12])
    parser.add_argument("--method", choices=("wanda", "sparsegpt", "magnitude"),
                        help="default wanda; sparsegpt (the only one allowed) with --llmcompressor")
    parser.add_argument("--llmcompressor", action="store_true",
                        help="also prune each depth with llm-compressor's SparseGPT 50%% and compare peak memory")
    parser.add_argument("--llmc-python", type=Path, help="a python that imports llmcompressor (default: "
                        "bench/oneshot.py's venv, bench/out/llmc-venv, built if missing)")
    parser.add_argument("--llmc-timeout", type=float, default=7200.0,
                        help="seconds allowed per llm-compressor depth (it takes about 2 min of one core per block here)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llmcompressor and args.method not in (None, "sparsegpt"):
        parser.error(f"--llmcompressor compares SparseGPT: --method {args.method} is not allowed with it (use sparsegpt)")
    method = args.method or ("sparsegpt" if args.llmcompressor else "wanda")
    if args.cell:
        kind, layers, path = args.cell
        if kind == "write":
            print(json.dumps({"weight_bytes": write(int(layers), Path(path))}))
        elif kind == "llmc":
            print("RESULT " + json.dumps(prune_llmc(int(layers), Path(path))), flush=True)
        else:
            print(json.dumps(prune_one(int(layers), Path(path), method)))
        return
    python = None
    if args.llmcompressor:
        python = args.llmc_python or llmc_python(args.llmc_timeout)
        if python is None:
            sys.exit("llm-compressor is not available")
        python = python.absolute()  # the cells run in the scratch folder
    start_load = os.getloadavg()
    print(f"load: {start_load[0]:.2f} (1 min)", flush=True)
    if python is None:
        print("| layers | weights MB | peak RSS MB (process) | RSS before pruning MB | increase MB | prune s | sparsity |")
        print("|---|---|---|---|---|---|---|")
    else:
        print(f"method sparsegpt 50%, lm_head excluded, {SAMPLES} x {SEQ_LEN} calibration tokens on both; "
              f"llm-compressor: {python}", flush=True)
        print("| layers | weights MB | our peak MB | their peak MB | ours/theirs | RSS after imports (ours / theirs) "
              "| peak over imports (ours / theirs) | our prune s | their prune s | our sparsity | their sparsity "
              "| lm_head sparsity (ours / theirs) | load (1 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            folder = Path(tmp) / f"model-{layers}"
            run = [sys.executable, __file__, "--method", method, "--cell"]
            cell([*run, "write", str(layers), str(folder)])
            load = os.getloadavg()[0]
            row = json.loads(cell([*run, "prune", str(layers), str(folder)]).strip().splitlines()[-1])
            row["load"] = load
            (folder.parent / f"pruned-{layers}.safetensors").unlink()
            if python is None:
                print(f"| {layers} | {row['weights_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['peak_rss_mb_before']:.0f} | "
                      f"{row['peak_rss_mb'] - row['peak_rss_mb_before']:.0f} | {row['prune_seconds']:.1f} | "
                      f"{row['sparsity']:.3f} |", flush=True)
            else:
                print(f"secateurs, {layers} layers: peak {row['peak_rss_mb']:.0f} MB, {row['prune_seconds']:.1f} s; "
                      "llm-compressor next", file=sys.stderr, flush=True)
                ref = run_llmc(python, layers, folder, args.llmc_timeout)
                if ref is not None:
                    ref["load"] = os.getloadavg()[0]
                row["llmcompressor"] = ref
                ratio = "n/a" if ref is None else f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
                print(f"| {layers} | {row['weights_mb']:.0f} | {row['peak_rss_mb']:.0f} | {field(ref, 'peak_rss_mb', '.0f')} | "
                      f"{ratio} | {row['rss_mb_imports']:.0f} / {field(ref, 'rss_mb_imports', '.0f')} | "
                      f"{row['peak_rss_mb'] - row['rss_mb_imports']:.0f} / "
                      f"{'n/a' if ref is None else format(ref['peak_rss_mb'] - ref['rss_mb_imports'], '.0f')} | "
                      f"{row['prune_seconds']:.1f} | {field(ref, 'prune_seconds', '.1f')} | {row['block_sparsity']:.3f} | "
                      f"{field(ref, 'block_sparsity', '.3f')} | {row['lm_head_sparsity']:.3f} / {field(ref, 'lm_head_sparsity', '.3f')} | "
                      f"{load:.1f} / {field(ref, 'load', '.1f')} |", flush=True)
            rows.append(row)
            shutil.rmtree(folder)
    end_load = os.getloadavg()
    print(f"load: {end_load[0]:.2f} (1 min)")
    if args.json:
        args.json.write_text(json.dumps({"start_load": start_load, "end_load": end_load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
