"""prune.structured_transformer(sequential=): with calibration data, each attention layer / MLP
is scored and reconstructed on what the already-pruned layers before it produce (as
prune.oneshot calibrates block by block); sequential=False scores all of them on the dense model.

The reference is a hand computation on inputs captured by a hook: FLAP's bias reconstruction
gives the next layer ``b + W[:, removed] @ mean(a[removed])``, where ``a`` are the MLP's hidden
activations over the calibration tokens; sequential must use ``a`` computed on the *pruned*
model's inputs to that MLP, parallel on the dense model's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 16), generator=g), "attention_mask": mask})
    return out


@torch.no_grad()
def mlp_inputs(model: nn.Module, layer: int, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The non-padding inputs of ``model``'s layer-``layer`` intermediate.dense, via a hook."""
    seen = []
    lin = model.encoder.layer[layer].intermediate.dense
    handle = lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        xs = []
        for x in data:
            model(**x)
            xs.append(seen.pop()[x["attention_mask"].bool()])
    finally:
        handle.remove()
    return torch.cat(xs).double()


def expected_bias(dense: nn.Module, small: nn.Module, inputs: torch.Tensor, layer: int) -> torch.Tensor:
    """FLAP by hand: the dense layer's activations on ``inputs``, the removed ones' mean folded in."""
    d = dense.encoder.layer[layer]
    a = nn.functional.gelu(inputs @ d.intermediate.dense.weight.double().T + d.intermediate.dense.bias.double())
    record = prune.pruning_record(small)
    assert record is not None
    gone = torch.tensor(record["parts"][f"encoder.layer.{layer}/neurons"]["removed"])
    w = d.output.dense.weight.detach().double()
    return d.output.dense.bias.double() + w[:, gone] @ a.mean(0)[gone]


def test_sequential_calibrates_each_layer_on_the_pruned_model_and_parallel_on_the_dense_one() -> None:
    dense, data = bert(), batches()
    seq = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=data, reconstruct="bias")
    par = prune.structured_transformer(dense, neurons=0.5, criterion="fluctuation", calibration=data, reconstruct="bias",
                                       sequential=False)
    assert prune.pruning_record(seq)["sequential"] and not prune.pruning_record(par)["sequential"]
    # Layer 0 sees the same (dense) inputs either way.
    torch.testing.assert_close(seq.encoder.layer[0].output.dense.bias.double(),
                               expected_bias(dense, seq, mlp_inputs(dense, 0, data), 0), rtol=1e-5, atol=1e-6)
    # Layer 1: sequential on what the pruned layer 0 feeds it (captured in the pruned model itself),
    pruned_in, dense_in = mlp_inputs(seq, 1, data), mlp_inputs(dense, 1, data)
    assert not torch.allclose(pruned_in, dense_in, atol=1e-3)
    torch.testing.assert_close(seq.encoder.layer[1].output.dense.bias.double(),
                               expected_bias(dense, seq, pruned_in, 1), rtol=1e-5, atol=1e-6)
    # parallel on the dense model's.
    torch.testing.assert_close(par.encoder.layer[1].output.dense.bias.double(),
                               expected_bias(dense, par, dense_in, 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seq.encoder.layer[1].output.dense.bias, par.encoder.layer[1].output.dense.bias, atol=1e-4)


def test_sequential_calibration_leaves_no_hooks_behind_and_the_input_model_alone() -> None:
    dense, data = bert(), batches(2)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    small = prune.structured_transformer(dense, sparsity=0.5, criterion="activation", calibration=data, reconstruct="lstsq")
    for model in (dense, small):
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_sequential_is_a_bool() -> None:
    with pytest.raises(SecateursError, match=r"^sequential: got 'yes'; allowed: True or False"):
        prune.structured_transformer(bert(), sparsity=0.5, sequential="yes")  # type: ignore[arg-type]
