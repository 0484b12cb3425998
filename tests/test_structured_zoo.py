"""structured() on the architectures of Torch-Pruning's model list: grouped convolutions (ResNeXt,
RegNet), Vision Transformers, and models whose output shape pruning would change.

The reference for each pruned model is the dense model with the removed channels zeroed: the
same function, computed without surgery. Which channels were removed is read back from the
weights (each kept filter is a filter of the dense model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.measure import count_macs
from secateurs.prune.surgery import load_structured, pruning_record, save_structured, structured

torchvision = pytest.importorskip("torchvision")


def kept(dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of the entries of the 1-d ``dense`` (distinct random values, such as a BatchNorm's
    running mean) that ``pruned`` kept, in order."""
    hits = [int(torch.nonzero(dense == v).flatten()[0]) for v in pruned]
    assert hits == sorted(hits) and len(set(hits)) == len(hits)
    return torch.tensor(hits)


def zero_rows_(layer: nn.Module, keep: torch.Tensor) -> None:
    """Zero every output channel of a conv/linear (and its BatchNorm) that is not in ``keep``."""
    drop = torch.ones(layer.weight.shape[0], dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        layer.weight[drop] = 0
        if getattr(layer, "bias", None) is not None:
            layer.bias[drop] = 0


class GroupedNet(nn.Module):
    """A ResNeXt-style bottleneck: 1x1, grouped 3x3 (4 groups), 1x1, with BatchNorms and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.head(torch.relu(x + y).mean((2, 3)))


def randomize_bn_(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def grouped_net() -> nn.Module:
    torch.manual_seed(0)
    model = GroupedNet()
    randomize_bn_(model)
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_grouped_convolution_loses_the_same_positions_in_every_group() -> None:
    model = grouped_net()
    small = structured(model, X, sparsity=0.5)
    assert (small.conv2.in_channels, small.conv2.out_channels, small.conv2.groups) == (8, 8, 4)
    assert small.conv2.weight.shape == (8, 2, 3, 3)
    for keep in (kept(model.bn1.running_mean, small.bn1.running_mean), kept(model.bn2.running_mean, small.bn2.running_mean)):
        positions = (keep % 4).reshape(4, 2)  # 4 groups of 4 channels, 2 kept in each
        assert (positions == positions[0]).all() and (keep // 4 == torch.arange(4).repeat_interleave(2)).all()
    assert count_macs(small, X) < 0.45 * count_macs(model, X)


def test_a_pruned_grouped_net_equals_the_dense_one_with_those_channels_zeroed() -> None:
    model = grouped_net()
    small = structured(model, X, sparsity=0.5, exclude=["stem"])  # the residual stream stays whole
    reference = grouped_net()
    for name in ("conv1", "conv2"):
        keep = kept(getattr(model, "bn" + name[-1]).running_mean, getattr(small, "bn" + name[-1]).running_mean)
        zero_rows_(getattr(reference, name), keep)
        bn = getattr(reference, "bn" + name[-1])
        drop = torch.ones(16, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():  # the channel's BatchNorm output is then relu(0 * w + b'): zero it too
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    torch.testing.assert_close(small(X), reference(X), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small(X), model(X), atol=1e-4)  # something real was removed


def test_a_pruned_grouped_net_saves_and_loads(tmp_path: Path) -> None:
    small = structured(grouped_net(), X, sparsity=0.5)
    save_structured(small, tmp_path / "g.safetensors")
    loaded = load_structured(tmp_path / "g.safetensors", GroupedNet()).eval()
    assert loaded.conv2.groups == 4 and loaded.conv2.weight.shape == small.conv2.weight.shape
    assert torch.equal(loaded(X), small(X))
    assert pruning_record(loaded) == pruning_record(small)


def test_the_caller_model_shares_no_tensor_with_the_pruned_copy() -> None:
    model = grouped_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = structured(model, X, sparsity=0.5, exclude=["head"])
    ours = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    theirs = {t.untyped_storage().data_ptr() for t in [*small.parameters(), *small.buffers()]}
    assert not ours & theirs
    with torch.no_grad():
        small.head.weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resnext_block_from_torchvision_is_pruned_by_whole_group_positions() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    small = structured(model, x, sparsity=0.5)
    assert small(x).shape == (1, 10)
    conv = small.layer1[0].conv2
    assert conv.groups == 8 and conv.in_channels == conv.out_channels == 16
    assert count_macs(small, x) < 0.35 * count_macs(model, x)


def kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``dense`` that ``pruned`` kept (rows of equal width), in order."""
    hits = [int(torch.nonzero((dense == row).all(1)).flatten()[0]) for row in pruned.detach()]
    assert hits == sorted(hits) and len(set(hits)) == len(hits)
    return torch.tensor(hits)


def zero_columns_(layer: nn.Linear, keep: torch.Tensor) -> None:
    drop = torch.ones(layer.in_features, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        layer.weight[:, drop] = 0


def tiny_timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_heads=4, embed_dim=64, num_classes=10).eval()


XI = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_a_timm_vit_loses_whole_heads_and_mlp_neurons_and_equals_the_dense_one_with_them_zeroed() -> None:
    model = tiny_timm_vit()
    small = structured(model, XI, sparsity=0.5, exclude=["patch_embed"])  # keep the embedding width
    reference = tiny_timm_vit()
    for block, dense, ref in zip(small.blocks, model.blocks, reference.blocks, strict=True):
        attn = block.attn
        assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 16, 96, 32)
        rows = kept_rows(dense.attn.qkv.weight, attn.qkv.weight)
        heads = (rows % 64) // 16
        assert torch.equal(heads.reshape(3, -1), heads[:32].repeat(3, 1))  # q, k and v lose the same heads
        assert (torch.bincount(heads, minlength=4)[torch.unique(heads)] == 3 * 16).all()  # whole heads
        zero_columns_(ref.attn.proj, rows[rows >= 128] - 128)  # the removed heads' values reach nothing
        zero_columns_(ref.mlp.fc2, kept_rows(dense.mlp.fc1.weight, block.mlp.fc1.weight))
        assert block.mlp.fc1.out_features == 128
    torch.testing.assert_close(small(XI), reference(XI), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(small(XI), model(XI), atol=1e-3)


def test_a_timm_vit_with_its_embedding_width_pruned_runs_and_saves(tmp_path: Path) -> None:
    small = structured(tiny_timm_vit(), XI, sparsity=0.5)
    assert small.patch_embed.proj.out_channels == 32 and small.pos_embed.shape[-1] == 32
    assert small(XI).shape == (2, 10)
    save_structured(small, tmp_path / "vit.safetensors")
    loaded = load_structured(tmp_path / "vit.safetensors", tiny_timm_vit())
    assert loaded.blocks[0].attn.num_heads == small.blocks[0].attn.num_heads
    torch.testing.assert_close(loaded(XI), small(XI), rtol=0, atol=0)


def tiny_torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=64, num_classes=10).eval()


def test_a_torchvision_vit_is_pruned_and_its_hidden_dim_follows(tmp_path: Path) -> None:
    model = tiny_torchvision_vit()
    small = structured(model, XI, sparsity=0.5)
    # nn.MultiheadAttention ties its heads to the residual width: a head goes with its channels.
    assert small.hidden_dim == small.conv_proj.out_channels == 16
    assert [b.self_attention.num_heads for b in small.encoder.layers] == [2, 2]
    assert [b.mlp[0].out_features for b in small.encoder.layers] == [32, 32]
    assert small(XI).shape == (2, 10)
    assert count_macs(small, XI) < 0.4 * count_macs(model, XI)
    save_structured(small, tmp_path / "tv.safetensors")
    loaded = load_structured(tmp_path / "tv.safetensors", tiny_torchvision_vit())
    assert loaded.hidden_dim == 16
    torch.testing.assert_close(loaded(XI), small(XI), rtol=0, atol=0)


def test_a_channel_shuffle_is_refused_naming_the_layers_instead_of_returning_a_wrong_model() -> None:
    # Torch-Pruning's graph traces this small ShuffleNet but maps the shuffled channels wrongly:
    # the model it prunes keeps its output shape and computes something else.
    torch.manual_seed(0)
    model = torchvision.models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10).eval()
    with pytest.raises(SecateursError, match=r"model: layers 'stage2.0', 'stage3.0', 'stage4.0' shuffle channels"):
        structured(model, XI, sparsity=0.5)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y.view(y.shape[0], 2, 4, *y.shape[2:]).permute(0, 2, 1, 3, 4).reshape(y.shape)
        return self.b(y).mean((2, 3))


def test_a_permute_shuffle_is_refused_too() -> None:
    # (reshapes and permutes of other dims, as in every ViT, are not shuffles: see the ViT tests)
    with pytest.raises(SecateursError, match=r"model: layer '' shuffles channels"):
        structured(Shuffle(), XI, sparsity=0.5)
