"""Streamed one-shot pruning: blocks read from a safetensors file, pruned and written one at a
time, give the same model as pruning it in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.prune.calibration import empty_weights, oneshot_streamed

transformers = pytest.importorskip("transformers")


def _config(tie: bool = False):  # type: ignore[no-untyped-def]
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


def _saved(tmp_path: Path, tie: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(tie)).eval()
    path = tmp_path / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")
    save_file(state, str(path))
    return model, path


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(3)]


@pytest.mark.parametrize(("method", "options", "tie"), [
    ("sparsegpt", {"sparsity": 0.5}, False),
    ("sparsegpt", {"pattern": "2:4", "exclude": ["lm_head"]}, False),
    ("sparsegpt", {"pattern": "2:4", "exclude": ["lm_head"], "dense_targets": True, "refine": 5}, False),
    ("wanda", {"sparsity": 0.6}, True),
    ("magnitude", {"sparsity": 0.5}, False),
])
def test_the_streamed_result_equals_pruning_in_memory_bit_for_bit(tmp_path: Path, method: str, options: dict, tie: bool) -> None:
    model, path = _saved(tmp_path, tie)
    data = None if method == "magnitude" else _batches()
    in_memory = prune.oneshot(model, data, method=method, **options)
    with empty_weights():
        skeleton = transformers.LlamaForCausalLM(_config(tie)).eval()
    assert skeleton.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    out = tmp_path / "pruned.safetensors"
    streamed = oneshot_streamed(skeleton, path, out, data, method=method, **options)
    written = load_file(str(out))
    expected = model.state_dict()
    assert set(written) == set(load_file(str(path)))
    for key, value in written.items():
        assert torch.equal(value, expected[key]), key
    assert [layer.name for layer in streamed.layers] == [layer.name for layer in in_memory.layers]
    assert [layer.error for layer in streamed.layers] == [layer.error for layer in in_memory.layers]
    assert streamed.sparsity == in_memory.sparsity > 0.4
    # the blocks were dropped again: only what lies outside them is still in memory
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())
    assert skeleton.model.embed_tokens.weight.device.type == "cpu"


def test_a_failed_stream_leaves_no_output(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    with empty_weights():
        skeleton = transformers.LlamaForCausalLM(_config()).eval()
    out = tmp_path / "pruned.safetensors"
    with pytest.raises(SecateursError, match="calibration"):
        oneshot_streamed(skeleton, path, out, [{"input_ids": torch.full((1, 4), 99)}] * 0, method="wanda", sparsity=0.5)
    with pytest.raises(SecateursError, match="group"):
        oneshot_streamed(skeleton, path, out, _batches(), method="wanda", sparsity=0.5, group="global")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_state_dict_missing_a_weight_is_refused(tmp_path: Path) -> None:
    model, _ = _saved(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.2.mlp" not in k}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with empty_weights():
        skeleton = transformers.LlamaForCausalLM(_config()).eval()
    with pytest.raises(SecateursError, match=r"weights: .*layers\.2\.mlp"):
        oneshot_streamed(skeleton, path, tmp_path / "out.safetensors", _batches(), method="wanda", sparsity=0.5)
