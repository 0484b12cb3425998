"""prune.structured_transformer(hidden=): the residual-stream width removed from every place
that holds it at once (embeddings, every norm, attention and MLP in/out, LM head, pooler), the
config's hidden_size patched, and stock from_pretrained loading it bit-identically.

Zeroing the removed dims in the dense model is not a reference here: a norm over the kept dims
differs from one over all dims with some zeroed (the mean, variance or mean square change). The
references are instead:

- LLaMA (RMSNorm): zeroing the removed dims *and* scaling every RMSNorm by what the mean square
  over h dims becomes over h' (gain * sqrt(h'/h), epsilon * h'/h) is exactly the narrower model:
  ``w * x / sqrt(mean_h(x^2) + eps h'/h) * sqrt(h'/h) = w * x / sqrt(mean_h'(x^2) + eps)`` when the
  removed entries of x are 0, which the zeroed writers keep them;
- BERT (LayerNorm): a stock ``BertModel`` built from a config with the smaller sizes, loaded with
  the dense weights sliced by hand (name rules written out below) at the kept indices.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)


def llama(tie: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that slicing them matters
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def batches(n: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 11:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 16), generator=g), "attention_mask": mask})
    return out


def kept_hidden(model: nn.Module) -> torch.Tensor:
    record = prune.pruning_record(model)
    assert record is not None
    gone = set(record["hidden"]["removed"])
    return torch.tensor([d for d in range(record["hidden"]["units"]) if d not in gone])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_hidden_pruning_round_trips_through_stock_save_and_load(tmp_path: Path, tie: bool) -> None:
    small = prune.structured_transformer(llama(tie), hidden=0.25, sparsity=0.5, criterion="activation",
                                         calibration=batches(), reconstruct="bias")
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    c = loaded.config
    assert c.hidden_size == 48 and c.head_dim == 8 and c.num_attention_heads == 4
    assert loaded.model.embed_tokens.weight.shape == (128, 48) and loaded.lm_head.weight.shape == (128, 48)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    for layer in loaded.model.layers:
        assert layer.input_layernorm.weight.shape == layer.post_attention_layernorm.weight.shape == (48,)
        assert layer.self_attn.q_proj.weight.shape == (c.num_attention_heads * c.head_dim, 48)
        assert layer.self_attn.o_proj.weight.shape == (48, c.num_attention_heads * c.head_dim)
        assert layer.mlp.down_proj.weight.shape == (48, c.intermediate_size)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(small(**x).logits, loaded(**x).logits)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_hidden_pruning_equals_the_zeroed_dense_model_with_rescaled_rms_norms(tie: bool) -> None:
    dense = llama(tie)
    small = prune.structured_transformer(dense, hidden=0.25)
    keep = kept_hidden(small)
    h, k = 64, len(keep)
    assert k == 48
    drop = torch.ones(h, dtype=torch.bool)
    drop[keep] = False
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, drop] = 0
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[drop] = 0
        for m in ref.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.mul_(math.sqrt(k / h))
                m.variance_epsilon = m.variance_epsilon * k / h
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, ref(**x).logits, rtol=1e-5, atol=1e-5)


def _slice_bert(dense: nn.Module, small: nn.Module) -> dict[str, torch.Tensor]:
    """The dense state dict cut by hand at the kept hidden dims, heads and neurons."""
    record = prune.pruning_record(small)
    assert record is not None
    hk = kept_hidden(small)
    size = dense.config.hidden_size // dense.config.num_attention_heads
    out = {}
    for name, t in dense.state_dict().items():
        if name.endswith("position_ids") or name.endswith("token_type_ids"):
            out[name] = t
            continue
        i = name.split(".")
        layer = ".".join(i[:3]) if name.startswith("encoder.layer.") else ""
        head_rows = hk
        if layer:
            gone = set(record["parts"][f"{layer}.attention/heads"]["removed"])
            heads = [h for h in range(dense.config.num_attention_heads) if h not in gone]
            head_rows = torch.tensor([h * size + j for h in heads for j in range(size)])
            gone_n = set(record["parts"][f"{layer}/neurons"]["removed"])
            neuron_rows = torch.tensor([n for n in range(dense.config.intermediate_size) if n not in gone_n])
        if "embeddings" in name and name.endswith("_embeddings.weight"):
            t = t[:, hk]
        elif "LayerNorm" in name:
            t = t[hk]
        elif any(f"attention.self.{p}." in name for p in ("query", "key", "value")):
            t = t[head_rows][:, hk] if t.dim() == 2 else t[head_rows]
        elif "attention.output.dense" in name:
            t = t[hk][:, head_rows] if t.dim() == 2 else t[hk]
        elif "intermediate.dense" in name:
            t = t[neuron_rows][:, hk] if t.dim() == 2 else t[neuron_rows]
        elif "output.dense" in name:
            t = t[hk][:, neuron_rows] if t.dim() == 2 else t[hk]
        elif name.startswith("pooler.dense"):
            t = t[hk][:, hk] if t.dim() == 2 else t[hk]
        else:
            raise AssertionError(f"no rule for {name}")
        out[name] = t
    return out


def test_bert_heads_and_hidden_removed_together_equal_a_stock_bert_of_the_small_sizes_with_sliced_weights(
        tmp_path: Path) -> None:
    dense = bert()
    small = prune.structured_transformer(dense, heads=0.25, neurons=0.5, hidden=0.25, criterion="activation",
                                         calibration=batches())
    prune.check_pretrained(small)
    c = small.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (48, 3, 64)
    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=64, max_position_embeddings=64)
    ref = transformers.BertModel(config).eval()
    ref.load_state_dict(_slice_bert(dense, small))
    x = batches(1, seed=6)[0]
    with torch.no_grad():
        ours = small(**x)
        torch.testing.assert_close(ours.last_hidden_state, ref(**x).last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.pooler_output, ref(**x).pooler_output, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.encoder.layer[0].attention.self.attention_head_size == 16
    with torch.no_grad():
        assert torch.equal(ours.last_hidden_state, loaded(**x).last_hidden_state)


def test_bert_hidden_removed_without_the_same_share_of_heads_is_refused_saying_what_to_do() -> None:
    small = prune.structured_transformer(bert(), hidden=0.25)
    with pytest.raises(SecateursError, match=r"4 heads of 16 per layer on hidden_size 48.*allowed: hidden= the same "
                                             r"fraction as heads= \(so that hidden_size = 4 x 16 = 64\)"):
        prune.check_pretrained(small)
    x = batches(1)[0]
    with torch.no_grad():
        assert small(**x).last_hidden_state.shape == (2, 16, 48)


def test_the_llama_hidden_size_is_rounded_to_a_multiple_of_the_head_count() -> None:
    small = prune.structured_transformer(llama(), hidden=0.3)  # 64 * 0.7 = 44.8 -> 48, a multiple of 8 heads
    assert small.config.hidden_size == 48 == small.model.norm.weight.shape[0]


def test_hidden_dims_with_the_largest_weights_are_kept() -> None:
    dense = llama()
    with torch.no_grad():
        dense.model.embed_tokens.weight[:, :16] *= 100  # dims 0..15 dominate every norm of the weights
    small = prune.structured_transformer(dense, hidden=0.75)
    assert kept_hidden(small).tolist() == list(range(16))


@pytest.mark.parametrize(("model", "options", "message"), [
    (llama, {"hidden": 1.0}, r"^hidden: got 1\.0; allowed: a number in \[0, 1\)"),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                   enable_nested_tensor=False), {"hidden": 0.5},
     r"^hidden: got 'a TransformerEncoder'; allowed: a Hugging Face LLaMA- or BERT-family model"),
])
def test_bad_hidden_requests_name_the_argument(model, options: dict, message: str) -> None:
    with pytest.raises(SecateursError, match=message):
        prune.structured_transformer(model(), **options)
