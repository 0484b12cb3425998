"""secateurs.recovery.distill: the pruned model learns back the dense one's outputs, under a
secateurs.clip rule; and the docstring examples of the structured-Transformer modules."""

from __future__ import annotations

import copy
import doctest
import importlib

import pytest
import torch
from torch import nn

from secateurs import clip, prune
from secateurs.errors import SecateursError
from secateurs.recovery import distill

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 16), generator=g), "attention_mask": mask})
    return out


def hidden_error(student: nn.Module, teacher: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum((student(**x).last_hidden_state - teacher(**x).last_hidden_state).square().mean().item() for x in data)


def test_distillation_brings_a_pruned_bert_closer_to_the_dense_one_and_leaves_the_teacher_alone() -> None:
    dense, data = bert(), batches()
    before = copy.deepcopy(dense.state_dict())
    small = prune.structured_transformer(dense, sparsity=0.5)
    start = hidden_error(small, dense, data)
    result = distill(small, dense, data, steps=60, lr=1e-3, rule=clip.GlobalNorm(1.0))
    assert hidden_error(small, dense, data) < 0.5 * start
    assert len(result.losses) == 60 and result.log.total_steps == 60
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert all(p.grad is None for p in dense.parameters())


def test_the_clip_rule_bounds_every_step_and_the_log_records_it() -> None:
    dense, data = bert(), batches(2)
    small = prune.structured_transformer(dense, sparsity=0.5)
    result = distill(small, dense, data, steps=5, lr=1e-3, rule=clip.GlobalNorm(1e-4))
    assert result.log.clipped_steps == 5
    assert all(after == pytest.approx(1e-4, rel=1e-3) for after in result.log.norms_after())
    assert all(before > 1e-4 for before in result.log.norms())


def test_a_causal_lm_is_distilled_on_next_token_distributions() -> None:
    dense, data = llama(), batches()
    small = prune.structured_transformer(dense, sparsity=0.5)

    def kl() -> float:
        with torch.no_grad():
            total = 0.0
            for x in data:
                s, t = small(**x).logits.log_softmax(-1), dense(**x).logits.log_softmax(-1)
                total += nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)[x["attention_mask"].bool()].mean().item()
            return total

    start = kl()
    result = distill(small, dense, data, steps=40, lr=2e-3)
    assert kl() < 0.7 * start
    assert result.losses[-1] < result.losses[0]


def test_the_first_loss_is_the_masked_distance_before_any_step() -> None:
    dense, data = bert(), batches(1)
    small = prune.structured_transformer(dense, sparsity=0.5)
    x = data[0]
    with torch.no_grad():
        per = (small(**x).last_hidden_state - dense(**x).last_hidden_state).square().mean(-1)
    want = per[x["attention_mask"].bool()].mean().item()
    result = distill(small, dense, data, steps=1, lr=1e-3, loss="mse")
    assert result.losses[0] == pytest.approx(want, rel=1e-5)


def test_the_pooled_loss_is_one_minus_the_cosine_of_the_mean_pooled_embeddings() -> None:
    dense, data = bert(), batches(1)
    small = prune.structured_transformer(dense, sparsity=0.5)
    x = data[0]
    m = x["attention_mask"].unsqueeze(-1).double()
    with torch.no_grad():
        s, t = small(**x).last_hidden_state.double(), dense(**x).last_hidden_state.double()
    # sentence-transformers' mean pooling: the padding positions (the last 4 of row 1) are left out
    want = 1 - nn.functional.cosine_similarity((s * m).sum(1) / m.sum(1), (t * m).sum(1) / m.sum(1), dim=-1).mean()
    padded = 1 - nn.functional.cosine_similarity(s.mean(1), t.mean(1), dim=-1).mean()
    assert padded.item() != pytest.approx(want.item(), rel=1e-2)  # the tolerance below tells the two apart
    result = distill(small, dense, data, steps=1, lr=1e-3, loss="pooled", validation=data)
    # 1 - cosine of two close float32 vectors: about 1e-4 relative error against float64
    assert result.losses[0] == pytest.approx(want.item(), rel=1e-3)
    assert result.validation[0] == (0, pytest.approx(want.item(), rel=1e-3))


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 0}, r"^steps: got 0; allowed: an integer >= 1"),
    ({"lr": -1.0}, r"^lr: got -1\.0; allowed: a number > 0"),
    ({"rule": "global_norm"}, r"^rule: got 'global_norm'; allowed: a secateurs\.clip Rule"),
    ({"loss": "l1"}, r"^loss: got 'l1'; allowed: auto, kl, mse, cosine, pooled"),
    ({"loss": "kl"}, r"^loss: got 'kl'; allowed: 'kl' for models whose output has logits"),
])
def test_bad_arguments_are_errors_naming_the_argument(options: dict, message: str) -> None:
    dense = bert()
    small = prune.structured_transformer(dense, sparsity=0.5)
    with pytest.raises(SecateursError, match=message):
        distill(small, dense, batches(1), **options)


@pytest.mark.parametrize("name", ["secateurs.prune.surgery.transformer", "secateurs.recovery"])
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------- every block's output, schedule, early stopping


def test_the_block_loss_adds_the_relative_error_of_every_block_output_as_hf_hidden_states_give_it() -> None:
    dense, data = bert(), batches(1)
    small = prune.structured_transformer(dense, sparsity=0.5)
    x = data[0]
    valid = x["attention_mask"].bool()
    with torch.no_grad():
        s = small(**x, output_hidden_states=True)
        t = dense(**x, output_hidden_states=True)
    final = (s.last_hidden_state - t.last_hidden_state).square().mean(-1)[valid].mean()
    blocks = [((a - b).square().sum(-1)[valid].sum() / b.square().sum(-1)[valid].sum())
              for a, b in zip(s.hidden_states[1:], t.hidden_states[1:], strict=True)]  # [0] is the embeddings
    want = final + 0.5 * torch.stack(blocks).mean()
    result = distill(small, dense, data, steps=1, lr=1e-3, loss="mse", layers="blocks", layer_weight=0.5)
    assert result.losses[0] == pytest.approx(want.item(), rel=1e-5)


def test_the_learning_rate_warms_up_linearly_then_follows_the_cosine() -> None:
    import math

    dense, data = bert(), batches(2)
    small = prune.structured_transformer(dense, sparsity=0.5)
    result = distill(small, dense, data, steps=10, lr=1e-3, schedule="cosine", warmup=2)
    want = [1e-3 * (s + 1) / 3 for s in range(2)] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert result.lrs == pytest.approx(want, rel=1e-9)


def test_early_stopping_keeps_the_weights_of_the_best_held_out_loss() -> None:
    dense, data, held = bert(), batches(2), batches(2, seed=9)
    small = prune.structured_transformer(dense, sparsity=0.5)
    # A learning rate far too high: the held-out loss gets worse after the first steps.
    seen: list[tuple[int, float]] = []
    result = distill(small, dense, data, steps=60, lr=0.3, validation=held, eval_every=2, patience=3,
                     on_validation=lambda step, v: seen.append((step, v)))
    assert seen == result.validation and [s for s, _ in seen] == list(range(0, 2 * len(seen), 2))
    values = [v for _, v in result.validation]
    assert len(result.losses) < 60  # stopped early
    best = min(range(len(values)), key=values.__getitem__)
    assert result.best_step == result.validation[best][0]
    n = sum(int(x["attention_mask"].sum()) for x in held)
    with torch.no_grad():
        now = sum(((small(**x).last_hidden_state - dense(**x).last_hidden_state).square().mean(-1)
                   [x["attention_mask"].bool()]).sum().item() for x in held) / n
    assert now == pytest.approx(values[best], rel=1e-5)
    assert values[-1] > values[best]


@pytest.mark.parametrize(("options", "message"), [
    ({"schedule": "step"}, r"^schedule: got 'step'; allowed: constant, cosine, linear"),
    ({"patience": 2}, r"^patience: got 2; allowed: None unless validation= batches are given"),
    ({"layers": ["encoder.nothing"]}, r"^layers: got 'encoder\.nothing'; allowed: names of modules present in both"),
    ({"warmup": 5, "steps": 5}, r"^warmup: got 5; allowed: fewer warm-up steps than steps \(5\)"),
])
def test_bad_recovery_options_name_the_argument(options: dict, message: str) -> None:
    dense = bert()
    small = prune.structured_transformer(dense, sparsity=0.5)
    with pytest.raises(SecateursError, match=message):
        distill(small, dense, batches(1), **options)
