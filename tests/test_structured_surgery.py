"""structured(): whole channels, neurons, hidden units and heads removed from every zoo model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.experiment.models import RNNClassifier, build_model
from secateurs.measure import count_macs, count_params
from secateurs.prune.surgery import channel_groups, pruning_record, structured
from secateurs.prune.surgery.layers import AttentionHeadPruner

DIGITS = (1, 8, 8)
ZOO = ["mlp", "seed-cnn", "vgg11-bn", "resnet20", "mobilenet", "lstm", "rnn", "transformer"]
SMALL = {"vgg11-bn": {"width": 0.25}, "mobilenet": {"width": 8}}


def zoo(name: str, input_shape: tuple[int, ...] = DIGITS) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=input_shape, num_classes=10, **SMALL.get(name, {}))


def x_for(input_shape: tuple[int, ...] = DIGITS, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_keeps_its_output_shape_and_shrinks(name: str, scope: str) -> None:
    model, x = zoo(name), x_for()
    small = structured(model, x, sparsity=0.5, scope=scope)
    assert small(x).shape == (3, 10)
    assert count_macs(small, x) < 0.6 * count_macs(model, x)
    assert count_params(small) < 0.6 * count_params(model)


def test_seed_cnn_on_32x32_inputs_is_pruned() -> None:
    model, x = zoo("seed-cnn", (3, 32, 32)), x_for((3, 32, 32), batch=2)
    small = structured(model, x, sparsity=0.5)
    assert small(x).shape == (2, 10)
    assert [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)] == [16, 32, 32]


def test_layer_ratio_removes_that_fraction_of_every_layer_as_torch_pruning() -> None:
    model, x = zoo("vgg11-bn"), x_for()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    small = structured(model, x, sparsity=0.5, scope="layer")
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [w // 2 for w in widths]
    assert [m.num_features for m in small.modules() if isinstance(m, nn.BatchNorm2d)] == [w // 2 for w in widths]
    ratio = count_macs(model, x) / count_macs(small, x)
    assert 3.7 < ratio < 4.1  # both sides of every 3x3 convolution halve


def test_global_ratio_removes_that_fraction_of_all_channels() -> None:
    model, x = zoo("mlp"), x_for()
    small = structured(model, x, sparsity=0.7, scope="global")
    kept = small.net[1].out_features + small.net[3].out_features
    assert kept == round(0.3 * 400)
    assert small.net[5].out_features == 10


def test_classifier_outputs_and_input_channels_stay_intact() -> None:
    model, x = zoo("resnet20"), x_for()
    small = structured(model, x, sparsity=0.6)
    assert small.fc.out_features == 10 and small.fc.in_features < 64
    assert small.conv1.in_channels == 1


def test_the_callers_model_is_not_modified() -> None:
    model, x = zoo("seed-cnn"), x_for()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structured(model, x, sparsity=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pruning_record(model) is None


def test_training_flags_are_kept() -> None:
    model, x = zoo("vgg11-bn"), x_for()
    model.train()
    assert structured(model, x, sparsity=0.3).training
    assert not structured(model.eval(), x, sparsity=0.3).training


def test_repeated_ratios_are_cumulative_not_compounded() -> None:
    model, x = zoo("seed-cnn"), x_for()
    once = structured(model, x, sparsity=0.5)
    twice = structured(structured(model, x, sparsity=0.25), x, sparsity=0.5)
    widths = lambda m: [c.out_channels for c in m.features if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert widths(twice) == widths(once) == [16, 32, 32]
    assert twice.classifier[1].out_features == 32


def test_a_ratio_already_reached_removes_nothing() -> None:
    model, x = zoo("mlp"), x_for()
    half = structured(model, x, sparsity=0.5)
    again = structured(half, x, sparsity=0.3)
    assert again.net[1].out_features == half.net[1].out_features == 150


def test_record_holds_original_and_kept_units() -> None:
    model, x = zoo("mlp"), x_for()
    record = pruning_record(structured(model, x, sparsity=0.5))
    assert record["macs"] == count_macs(model, x) and record["params"] == count_params(model)
    assert record["groups"]["net.1"]["units"] == 300 and record["groups"]["net.1"]["kept"] == 150


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_target_macs_prunes_until_that_fraction_of_the_original_remains(scope: str) -> None:
    model, x = zoo("seed-cnn"), x_for()
    dense = count_macs(model, x)
    small = structured(model, x, target_macs=0.4, scope=scope)
    assert 0.33 * dense < count_macs(small, x) <= 0.4 * dense


def test_target_macs_is_relative_to_the_original_model_across_calls() -> None:
    model, x = zoo("mlp"), x_for()
    dense = count_macs(model, x)
    small = structured(structured(model, x, target_macs=0.6), x, target_macs=0.3, rounds=2)
    assert 0.27 * dense < count_macs(small, x) <= 0.3 * dense


def test_rounds_reach_the_same_widths_as_one_shot() -> None:
    model, x = zoo("vgg11-bn"), x_for()
    one = structured(model, x, sparsity=0.5)
    three = structured(model, x, sparsity=0.5, rounds=3)
    assert [p.shape for p in one.parameters()] == [p.shape for p in three.parameters()]


def test_round_to_keeps_channel_counts_multiples_of_it() -> None:
    model, x = zoo("seed-cnn"), x_for()
    small = structured(model, x, sparsity=0.3, scope="global", round_to=8)
    assert all(m.out_channels % 8 == 0 for m in small.features if isinstance(m, nn.Conv2d))


def test_ignored_layers_keep_their_exact_shape() -> None:
    model, x = zoo("seed-cnn"), x_for()
    small = structured(model, x, sparsity=0.5, exclude=["features.3"])
    assert small.features[3].weight.shape == model.features[3].weight.shape
    assert small.features[6].out_channels == 32


def test_ignore_accepts_layer_types() -> None:
    model, x = zoo("seed-cnn"), x_for()
    small = structured(model, x, sparsity=0.5, exclude=[nn.Conv2d])
    assert [m.weight.shape for m in small.features if isinstance(m, nn.Conv2d)] == [
        m.weight.shape for m in model.features if isinstance(m, nn.Conv2d)
    ]
    assert small.classifier[1].out_features == 32


def test_max_layer_sparsity_bounds_what_global_pruning_takes_from_one_layer() -> None:
    model, x = zoo("mlp"), x_for()
    small = structured(model, x, sparsity=0.85, scope="global", max_layer_sparsity=0.5)
    assert small.net[1].out_features >= 150 and small.net[3].out_features >= 50


def test_removing_zero_neurons_leaves_the_mlp_function_unchanged() -> None:
    model, x = zoo("mlp"), x_for()
    with torch.no_grad():
        for layer, width in ((1, 300), (3, 100)):
            dead = torch.arange(0, width, 2)
            model.net[layer].weight[dead] = 0
            model.net[layer].bias[dead] = 0
            model.net[layer + 2].weight[:, dead] = 0
        expected = model(x)
    small = structured(model, x, sparsity=0.5)
    assert (small.net[1].out_features, small.net[3].out_features) == (150, 50)
    torch.testing.assert_close(small(x), expected)


def test_removing_zero_filters_leaves_the_seed_cnn_function_unchanged() -> None:
    model, x = zoo("seed-cnn"), x_for()
    with torch.no_grad():
        model.features[0].weight[16:] = 0
        model.features[0].bias[16:] = 0
        model.features[3].weight[:, 16:] = 0
        expected = model(x)
    total = 32 + 64 + 64 + 64  # every prunable channel
    small = structured(model, x, sparsity=16 / total, scope="global")
    assert [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)] == [16, 64, 64]
    torch.testing.assert_close(small(x), expected)


def test_removing_silent_hidden_units_leaves_the_lstm_function_unchanged() -> None:
    model, x = zoo("lstm"), x_for()
    rnn, h = model.rnn, model.rnn.hidden_size
    dead = torch.arange(1, h, 2)
    rows = torch.cat([dead + g * h for g in range(4)])
    with torch.no_grad():
        for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0):
            p[rows] = 0
        rnn.weight_hh_l0[:, dead] = 0
        model.fc.weight[:, dead] = 0
        expected = model(x)
    small = structured(model, x, sparsity=0.5)
    assert small.rnn.hidden_size == h // 2 and small.rnn.weight_hh_l0.shape == (4 * h // 2, h // 2)
    torch.testing.assert_close(small(x), expected)


def test_stacked_gru_loses_the_same_units_in_every_layer() -> None:
    torch.manual_seed(0)
    model, x = RNNClassifier(DIGITS, 10, hidden=32, cell="gru", layers=2), x_for()
    small = structured(model, x, sparsity=0.25)
    assert small.rnn.hidden_size == 24
    assert small.rnn.weight_ih_l1.shape == (3 * 24, 24) and small.rnn.weight_hh_l1.shape == (3 * 24, 24)
    assert small(x).shape == (3, 10)


def test_transformer_loses_whole_heads_and_ffn_width() -> None:
    model, x = zoo("transformer"), x_for()
    small = structured(model, x, sparsity=0.5)
    for block in small.blocks:
        assert block.attn.num_heads == 2 and block.attn.head_dim == 16 and block.attn.embed_dim == 32
        assert block.fc1.out_features == 64
    assert small.pos.shape == (1, 8, 32)


def test_head_removal_is_exact_when_the_head_is_silent() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        mha.out_proj.weight[:, 4:8] = 0  # head 1 contributes nothing to the output
        x[..., 4:8] = 0  # and nothing enters through its embedding channels
        expected = mha(x, x, x, need_weights=False)[0]
    AttentionHeadPruner().prune_out_channels(mha, list(range(4, 8)))
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 4, 8)
    keep = [*range(4), *range(8, 12)]
    got = mha(x[..., keep], x[..., keep], x[..., keep], need_weights=False)[0]
    torch.testing.assert_close(got, expected[..., keep])


def test_attention_channels_that_are_not_whole_heads_are_refused() -> None:
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="not whole heads"):
        AttentionHeadPruner().prune_out_channels(mha, [0, 1])


def test_channel_groups_describe_the_coupling_without_pruning() -> None:
    model, x = zoo("resnet20"), x_for()
    groups = {g.key: g for g in channel_groups(model, x)}
    stage1 = groups["conv1"]
    assert {"conv1", "bn1", "layers.0.conv1", "layers.0.bn2", "layers.2.conv2"} <= set(stage1.layers)
    assert "fc" not in groups
    assert model.conv1.out_channels == 16


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_the_open_unit_interval_is_refused(sparsity: float) -> None:
    with pytest.raises(SecateursError, match=r"sparsity: got .*allowed: a number in \(0, 1\)"):
        structured(zoo("mlp"), x_for(), sparsity=sparsity)


def test_sparsity_and_target_macs_are_exclusive() -> None:
    with pytest.raises(SecateursError, match="exactly one"):
        structured(zoo("mlp"), x_for(), sparsity=0.5, target_macs=0.5)
    with pytest.raises(SecateursError, match="exactly one"):
        structured(zoo("mlp"), x_for())


def test_unknown_scope_and_criterion_are_refused() -> None:
    with pytest.raises(SecateursError, match="scope"):
        structured(zoo("mlp"), x_for(), sparsity=0.5, scope="model")
    with pytest.raises(SecateursError, match="criterion: got 'l1'"):
        structured(zoo("mlp"), x_for(), sparsity=0.5, criterion="l1")


def test_everything_ignored_is_refused_with_the_reason() -> None:
    with pytest.raises(SecateursError, match=r"nothing is left to prune.*net\.1: touches excluded"):
        structured(zoo("mlp"), x_for(), sparsity=0.5, exclude=["net"])


def test_a_model_whose_only_layer_is_the_classifier_has_nothing_to_prune() -> None:
    with pytest.raises(SecateursError, match="feeds the model output"):
        structured(nn.Linear(4, 2), torch.zeros(1, 4), sparsity=0.5)


def test_unknown_ignore_name_is_refused() -> None:
    with pytest.raises(SecateursError, match=r"exclude: got 'features\.99'"):
        structured(zoo("seed-cnn"), x_for(), sparsity=0.5, exclude=["features.99"])


def test_unreachable_target_macs_names_the_reachable_fraction() -> None:
    with pytest.raises(SecateursError, match=r"target_macs: got 0\.001"):
        structured(zoo("mlp"), x_for(), target_macs=0.001)


def test_bidirectional_lstm_is_refused_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = build_model("lstm", input_shape=DIGITS, num_classes=10)
    model.rnn = nn.LSTM(8, 16, batch_first=True, bidirectional=True)
    model.fc = nn.Linear(32, 10)
    with pytest.raises(SecateursError, match=r"layer 'rnn': LSTM\(bidirectional=True"):
        structured(model, x_for(), sparsity=0.5)


def test_inputs_the_model_rejects_are_refused() -> None:
    with pytest.raises(SecateursError, match="example_inputs: the model fails on them"):
        structured(zoo("mlp"), torch.zeros(2, 5), sparsity=0.5)


class _MatmulLayer(nn.Module):
    """A layer the graph cannot see into: its weight is used in a raw matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_an_op_the_graph_cannot_handle_is_named_in_the_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _MatmulLayer(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SecateursError, match=r"'2' \(_MatmulLayer\) uses its parameters outside"):
        structured(model, torch.randn(2, 8), sparsity=0.5)


def test_torchvision_resnet18_is_pruned() -> None:
    tv = pytest.importorskip("torchvision")
    model, x = tv.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)  # 2: BatchNorm trains on 1x1 maps
    small = structured(model, x, sparsity=0.5)
    assert small(x).shape == (2, 10)
    assert count_macs(small, x) < 0.4 * count_macs(model, x)


def test_ignore_accepts_the_layers_themselves() -> None:
    model, x = zoo("seed-cnn"), x_for()
    small = structured(model, x, sparsity=0.5, exclude=[model.features[6]])
    assert small.features[6].weight.shape == model.features[6].weight.shape
    assert small.features[0].out_channels == 16 and small.classifier[1].out_features == 32


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 16), nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(y)))


def test_models_with_several_inputs_take_a_tuple() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4), torch.randn(2, 6))
    small = structured(_TwoInputs(), inputs, sparsity=0.25)
    assert small.a.out_features == small.b.out_features == 12
    assert small(*inputs).shape == (2, 3)


# ------------------------------------------- the check after surgery runs on the meta device


def _devices_seen(model: nn.Module) -> list[str]:
    """The devices of every input the first layer of ``model`` (and of its deep copies) sees."""
    seen: list[str] = []
    next(iter(model.children())).register_forward_pre_hook(lambda _m, args: seen.append(args[0].device.type))
    return seen


def test_the_pruned_model_is_checked_on_the_meta_device_not_by_a_second_real_pass() -> None:
    model, x = zoo("seed-cnn"), x_for()
    seen = _devices_seen(model)  # the hook travels with the deep copy that is pruned
    small = structured(model, x, sparsity=0.5)
    assert seen == ["cpu", "meta"]  # the trace, then the check
    assert small(x).shape == (3, 10)


class _ReadsAValue(nn.Module):
    """A forward that reads a value with ``.item()``, which the meta device cannot give."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h * (1.0 if h.sum().item() >= 0 else -1.0))


def test_a_model_the_meta_device_cannot_run_is_checked_by_a_real_pass() -> None:
    torch.manual_seed(0)
    model, x = _ReadsAValue(), torch.randn(2, 8)
    seen = _devices_seen(model)
    small = structured(model, x, sparsity=0.5)
    assert seen == ["cpu", "meta", "cpu"]
    assert small.a.out_features == 8 and small(x).shape == (2, 3)


def _wrong_conv_bias() -> nn.Module:
    conv = nn.Conv2d(3, 4, 3)
    conv.bias = nn.Parameter(torch.zeros(5))
    return conv


@pytest.mark.parametrize("broken", [
    lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ConvTranspose2d(5, 4, 3)),  # input channels
    lambda: nn.Sequential(nn.Conv2d(3, 3, 1), _wrong_conv_bias()),  # a bias of the wrong length
    lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv1d(5, 2, 1)),
], ids=["conv_transpose input channels", "conv bias", "conv1d input channels"])
def test_the_meta_check_refuses_what_a_real_pass_refuses_even_where_meta_kernels_do_not(broken) -> None:
    from secateurs.prune.surgery.cut import _shapes_on_meta

    model = broken().eval()
    x = torch.randn(1, 3, 8, 8) if isinstance(model[0], nn.Conv2d | nn.ConvTranspose2d) else torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError):
        model(x)
    assert _shapes_on_meta(model, x) is None


def test_the_meta_check_gives_the_real_output_shapes() -> None:
    from secateurs.prune.surgery.cut import _shapes_on_meta

    tv = pytest.importorskip("torchvision")
    model, x = tv.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _shapes_on_meta(model, x) == [tuple(model(x).shape)] == [(2, 10)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.ConvTranspose2d(4, 6, 3, groups=2)).eval()
    assert _shapes_on_meta(model, torch.randn(1, 3, 8, 8)) == [(1, 6, 8, 8)]
