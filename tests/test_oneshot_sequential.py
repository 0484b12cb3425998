"""Block discovery and sequential calibration: each block sees the pruned outputs before it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from secateurs import prune


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return x + scale * self.down(self.up(x).relu()), x  # a tuple, as Hugging Face layers return


class Chain(nn.Module):
    """stem -> blocks (a ModuleList the parent loops over, keywords passed) -> head."""

    def __init__(self, width: int = 8, depth: int = 3, parallel: bool = False):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.parallel:  # every block reads the stem's output: not a chain
            h = sum(block(h, scale=0.5)[0] for block in self.blocks)
        else:
            for block in self.blocks:
                h = block(h, scale=0.5)[0]
        return self.head(h)


def _seen_by(module: nn.Module) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("parallel", [False, True])
def test_each_block_is_calibrated_on_the_pruned_outputs_before_it(parallel: bool) -> None:
    torch.manual_seed(0)
    model = Chain(parallel=parallel)
    dense = Chain(parallel=parallel)
    dense.load_state_dict(model.state_dict())
    batches = [torch.randn(16, 4) for _ in range(3)]
    seen, handle = _seen_by(model.blocks[1].up)
    result = prune.oneshot(model, batches, method="sparsegpt", sparsity=0.5)
    handle.remove()
    assert result.units == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    with torch.no_grad():
        x = torch.cat(batches)
        feed = model.stem(x) if parallel else model.blocks[0](model.stem(x), scale=0.5)[0]
        dense_feed = dense.stem(x) if parallel else dense.blocks[0](dense.stem(x), scale=0.5)[0]
    # call 0 is the probe (one dense forward that finds the order of the units); the next
    # len(batches) are the statistics pass over block 1, with the stem and block 0 pruned
    stats_pass = torch.cat(seen[1 : 1 + len(batches)])
    torch.testing.assert_close(stats_pass, feed)
    assert not torch.allclose(stats_pass, dense_feed, atol=1e-3)


def test_chained_blocks_reuse_stored_outputs_and_others_rerun_the_model() -> None:
    from secateurs.prune.calibration.capture import make_batches, plan_units
    from secateurs.prune.masks import find_targets

    for parallel, chained in ((False, [False, False, True, True, False]), (True, [False] * 5)):
        model = Chain(parallel=parallel)
        units = plan_units(model, find_targets(model), make_batches([torch.randn(2, 4)])[0])
        assert [u.chained for u in units] == chained


def test_blocks_of_a_resnet_are_its_residual_blocks() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    result = prune.oneshot(model, [torch.randn(2, 3, 32, 32)], method="wanda", sparsity=0.5)
    assert result.units == ["conv1", *(f"layer{s}.{b}" for s in range(1, 5) for b in range(2)), "fc"]
    assert all(layer.sparsity == pytest.approx(0.5, abs=0.01) for layer in result.layers)
    assert {layer.method for layer in result.layers} == {"wanda"}


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


def test_padding_positions_are_left_out_of_the_statistics() -> None:
    torch.manual_seed(0)
    model = TokenModel()
    w = model.proj.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    with torch.no_grad():
        model.embed.weight[0] = 50.0  # a loud padding token: counting it would change the mask
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    prune.oneshot(model, [{"input_ids": ids, "attention_mask": mask}], method="wanda", sparsity=0.5)
    x = model.embed(ids)[mask.bool()].detach()
    score = w.abs() * x.square().sum(0).sqrt()
    expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :3], False)
    assert torch.equal(model.proj.weight != 0, expected)


def _tiny_bert():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _tiny_llama(dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def test_hugging_face_encoder_blocks_are_found_and_padding_changes_nothing() -> None:
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    padded = ids.clone()
    padded[1, 6:] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    together = _tiny_bert()
    result = prune.oneshot(together, [{"input_ids": padded, "attention_mask": mask}], method="sparsegpt", sparsity=0.5)
    apart = _tiny_bert()
    prune.oneshot(apart, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :6]}], method="sparsegpt", sparsity=0.5)
    assert result.units[:3] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert result.units[3:] == ["pooler.dense"]
    for (name, a), b in zip(together.state_dict().items(), apart.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoder_lm_is_pruned_block_by_block_in_its_own_dtype(dtype: torch.dtype) -> None:
    model = _tiny_llama(dtype)
    keys = list(model.state_dict())
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    result = prune.oneshot(model, [{"input_ids": ids}], method="sparsegpt", pattern="2:4")
    assert result.units == ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    assert list(model.state_dict()) == keys
    assert all(p.dtype == dtype for p in model.parameters())
    for layer in result.layers:
        w = dict(model.named_parameters())[layer.name]
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2), layer.name
        assert layer.error is not None and 0 < layer.error < 1
    assert model.config.use_cache is True  # restored
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_activations_can_be_held_on_another_device_than_the_block() -> None:
    model = _tiny_llama()
    reference = _tiny_llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    prune.oneshot(model, [{"input_ids": ids}], method="wanda", sparsity=0.5, offload="cpu")
    prune.oneshot(reference, [{"input_ids": ids}], method="wanda", sparsity=0.5)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_result_is_an_ordinary_model_that_fine_tunes_with_a_pruner_and_saves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Chain()
    prune.oneshot(model, [torch.randn(16, 4)], method="sparsegpt", sparsity=0.5)
    zeros = {n: (p == 0) for n, p in model.named_parameters() if n.endswith("weight")}
    pruner = prune.Pruner(model, sparsity=0.5, scope="layer")
    pruner.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in zeros:
            assert torch.equal(p == 0, zeros[n]), n  # the oneshot mask is what the pruner keeps
    prune.save(model, tmp_path / "m.safetensors")
    again = Chain()
    prune.load(tmp_path / "m.safetensors", again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


class Twice(nn.Module):
    """``shared`` reads two inputs in one forward (its input, then its own output)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.after = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.shared(self.shared(x)))


def _record_first_group(module: nn.Module, batches: list[torch.Tensor]) -> tuple[object, list[int]]:
    from secateurs.prune.calibration.stats import Recorder, StopForward
    from secateurs.prune.masks import find_targets

    first = next(iter(module.children()))
    ran: list[int] = []
    handle = first.register_forward_hook(lambda m, args, out: ran.append(1))
    recorder = Recorder(find_targets(module), hessian=True, one_group=True)
    with recorder.record():
        for x in batches:
            with contextlib.suppress(StopForward):
                module(x)
            recorder.freeze()
    handle.remove()
    return recorder, ran


def test_after_the_first_batch_a_group_pass_ends_before_the_group_runs() -> None:
    torch.manual_seed(0)
    block = Block(8)
    batches = [torch.randn(5, 8) for _ in range(3)]
    recorder, ran = _record_first_group(block, batches)
    (name,) = recorder.group
    assert name.startswith("up")
    assert len(ran) == 1  # `up` ran on the first batch only, which found where the group ends
    x = torch.cat(batches)
    torch.testing.assert_close(recorder.stats[name].hessian, x.T @ x)


def test_a_layer_that_reads_two_inputs_per_forward_is_recorded_on_both_in_every_batch() -> None:
    torch.manual_seed(0)
    model = Twice()
    batches = [torch.randn(5, 8) for _ in range(3)]
    recorder, ran = _record_first_group(model, batches)
    (name,) = recorder.group
    assert name.startswith("shared")
    assert len(ran) == 2 + 1 * 2  # both calls on the first batch, the first call on the others
    with torch.no_grad():
        x = torch.cat(batches)
        y = model.shared(x)
    torch.testing.assert_close(recorder.stats[name].hessian, x.T @ x + y.T @ y)
