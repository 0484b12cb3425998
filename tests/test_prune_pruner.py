"""The Pruner: sparsity semantics, targets, model integrity, state, and every bad input."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.experiment.models import build_model
from secateurs.prune import Pruner, find_targets, make_criterion


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)


def zeros_of(model: nn.Module, pruner: Pruner) -> float:
    weights = [t.param for t in pruner.targets]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_step_reaches_the_target_fraction_of_all_targeted_weights():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.9)
    assert pruner.step() == pytest.approx(0.9, abs=1e-4)
    assert zeros_of(model, pruner) == pytest.approx(0.9, abs=1e-4)


def test_repeated_steps_never_compound():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.5)
    pruner.step()
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    assert pruner.step() == pytest.approx(0.5, abs=1e-4)
    assert all(torch.equal(masks[k], v) for k, v in pruner.masks.items())


def test_rising_sparsity_keeps_pruned_weights_pruned():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.9, criterion=make_criterion("random", seed=0))
    previous = None
    for target in (0.3, 0.5, 0.7, 0.9):
        assert pruner.step(target) == pytest.approx(target, abs=1e-4)
        current = torch.cat([m.reshape(-1) for m in pruner.masks.values()])
        if previous is not None:
            assert not (current & ~previous).any()  # nothing pruned came back
        previous = current


def test_lowering_sparsity_selects_afresh_at_the_lower_target():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.8)
    pruner.step()
    assert pruner.step(0.4) == pytest.approx(0.4, abs=1e-4)


def test_step_zero_prunes_nothing():
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    assert Pruner(model, sparsity=0.5).step(0.0) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_default_targets_are_weights_of_linear_conv_rnn_and_attention():
    model = build_model("transformer", input_shape=(1, 8, 8), num_classes=10)
    names = [t.name for t in find_targets(model)]
    assert "blocks.0.attn.in_proj_weight" in names
    assert "blocks.0.attn.out_proj.weight" in names
    assert "blocks.0.fc1.weight" in names
    assert not any("bias" in n or "norm" in n or n == "pos" for n in names)
    lstm = build_model("lstm", input_shape=(1, 8, 8), num_classes=10)
    assert [t.name for t in find_targets(lstm)] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]


def test_targets_and_exclude_accept_names_patterns_and_types():
    model = small_cnn()
    assert [t.name for t in find_targets(model, targets=[nn.Linear])] == ["classifier.1.weight", "classifier.3.weight"]
    assert [t.name for t in find_targets(model, targets=["features.*"])] == [
        "features.0.weight", "features.3.weight", "features.6.weight"]
    assert [t.name for t in find_targets(model, exclude=["classifier.3", nn.Conv2d])] == ["classifier.1.weight"]
    assert [t.name for t in find_targets(model, targets=["classifier.1.bias"])] == ["classifier.1.bias"]
    assert [t.name for t in find_targets(model, targets=["classifier.1.bias", "features.0.bias"])] == [
        "features.0.bias", "classifier.1.bias"]


def test_patterns_never_reach_biases_or_normalisation_gains():
    model = small_cnn()
    names = [t.name for t in find_targets(model, targets=["*"])]
    assert names == [t.name for t in find_targets(model)]
    assert not any(n.endswith(".bias") for n in names)
    with pytest.raises(SecateursError, match=r"targets: got '\*\.bias'; it matches only parameters a pattern never reaches"):
        find_targets(model, targets=["*.bias"])


def test_per_layer_sparsity_overrides_its_layer_and_the_rest_stay_global():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.9, per_layer={"classifier.3": 0.2, "features.0": 0.0})
    pruner.step()
    by_layer = pruner.layer_sparsity()
    assert by_layer["classifier.3.weight"] == pytest.approx(0.2, abs=1e-2)
    assert by_layer["features.0.weight"] == 0.0
    rest = [t for t in pruner.targets if t.module_name not in ("classifier.3", "features.0")]
    pruned = sum(by_layer[t.name] * t.numel for t in rest) / sum(t.numel for t in rest)
    assert pruned == pytest.approx(0.9, abs=1e-4)


def test_per_layer_scales_with_a_ramping_schedule():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.8, per_layer={"classifier.3": 0.4})
    pruner.step(0.4)
    assert pruner.layer_sparsity()["classifier.3.weight"] == pytest.approx(0.2, abs=1e-2)


def test_state_dict_keys_unchanged_and_pruned_state_loads_into_a_plain_instance():
    model = small_cnn()
    keys = list(model.state_dict())
    pruner = Pruner(model, sparsity=0.9)
    pruner.step()
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert list(model.state_dict()) == keys
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    plain = build_model("seed-cnn", input_shape=(1, 8, 8), num_classes=10)
    plain.load_state_dict(model.state_dict())  # strict
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(plain(x), model(x))


def test_deepcopy_and_pickle_of_a_pruned_model_and_its_pruner():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    pruner.step()
    x = torch.randn(4, 1, 8, 8)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        assert list(clone.state_dict()) == list(model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    pruner_clone = pickle.loads(pickle.dumps(pruner))
    assert pruner_clone.current_sparsity == pruner.current_sparsity
    model_copy, pruner_copy = copy.deepcopy((model, pruner))
    assert pruner_copy.model is model_copy


def test_finalize_removes_every_hook_and_keeps_the_zeros():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    pruner.step()
    assert optimizer._optimizer_step_pre_hooks and optimizer._optimizer_step_post_hooks
    assert pruner.finalize() is model
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert zeros_of(model, pruner) == pytest.approx(0.9, abs=1e-4)


def test_model_carries_no_hooks_while_pruning_and_scoring():
    model = small_cnn()
    pruner = Pruner(model, sparsity=0.5, criterion="activation")
    pruner.score([(torch.randn(2, 1, 8, 8), None)])
    pruner.step()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_pruner_state_round_trip_restores_masks_and_movement_scores():
    model = small_cnn()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    pruner = Pruner(model, sparsity=0.7, criterion="movement")
    pruner.score([(x, y)], nn.functional.cross_entropy)
    pruner.step()
    state = pruner.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored_state = torch.load(buffer, weights_only=True)  # tensors and plain types only

    fresh_model = small_cnn()
    fresh = Pruner(fresh_model, sparsity=0.7, criterion="movement")
    fresh.load_state_dict(restored_state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.masks.values(), pruner.masks.values(), strict=True))
    assert fresh.current_sparsity == pytest.approx(pruner.current_sparsity)
    assert zeros_of(fresh_model, fresh) >= fresh.current_sparsity
    assert all(torch.equal(a, b) for a, b in zip(fresh.scores().values(), pruner.scores().values(), strict=True))
    json.dumps({k: v for k, v in state.items() if k not in ("masks", "criterion")})


def test_load_state_dict_from_another_model_names_the_masks():
    pruner = Pruner(small_cnn(), sparsity=0.5)
    pruner.step()
    other = Pruner(nn.Linear(4, 4), sparsity=0.5)
    with pytest.raises(SecateursError, match="pruner state masks"):
        other.load_state_dict(pruner.state_dict())
    with pytest.raises(SecateursError, match="pruner state"):
        other.load_state_dict({"nothing": 1})


def test_masks_are_bool_and_one_byte_per_weight():
    pruner = Pruner(small_cnn(), sparsity=0.5)
    assert pruner.masks == {}
    pruner.step()
    for name, mask in pruner.masks.items():
        assert mask.dtype == torch.bool and mask.element_size() == 1, name


def test_pruned_zeros_are_positive_zero():
    model = nn.Linear(50, 50)
    with torch.no_grad():
        model.weight.copy_(-model.weight.abs() - 0.1)
    Pruner(model, sparsity=0.5).step()
    zeros = model.weight[model.weight == 0]
    assert zeros.numel() == 1250 and not torch.signbit(zeros).any()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_sparsity_outside_zero_one_names_the_field(sparsity):
    with pytest.raises(SecateursError, match=r"sparsity: got .*allowed: a number in \[0, 1\)"):
        Pruner(nn.Linear(4, 4), sparsity=sparsity)


def test_step_sparsity_outside_zero_one_names_the_field():
    pruner = Pruner(nn.Linear(4, 4), sparsity=0.5)
    with pytest.raises(SecateursError, match=r"sparsity: got 1\.0"):
        pruner.step(1.0)


def test_model_with_no_prunable_weight_is_refused():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(SecateursError, match="model: got Sequential with no prunable weight"):
        Pruner(model, sparsity=0.5)


def test_per_layer_names_that_match_nothing_are_refused():
    with pytest.raises(SecateursError, match=r"per_layer: got 'classifier\.9', which matches no targeted weight"):
        Pruner(small_cnn(), sparsity=0.5, per_layer={"classifier.9": 0.5})


def test_per_layer_sparsity_out_of_range_names_the_layer():
    with pytest.raises(SecateursError, match=r"per_layer\['classifier.1'\]: got 1.2"):
        Pruner(small_cnn(), sparsity=0.5, per_layer={"classifier.1": 1.2})


def test_unknown_scope_is_refused():
    with pytest.raises(SecateursError, match="scope: got 'local'; allowed: global, layer"):
        Pruner(nn.Linear(4, 4), sparsity=0.5, scope="local")


def test_targets_and_exclude_that_match_nothing_are_refused():
    with pytest.raises(SecateursError, match="targets: got 'nothing'"):
        Pruner(small_cnn(), sparsity=0.5, targets=["nothing"])
    with pytest.raises(SecateursError, match="exclude: got 'nothing'"):
        Pruner(small_cnn(), sparsity=0.5, exclude=["nothing"])
    with pytest.raises(SecateursError, match="targets: got 3"):
        Pruner(small_cnn(), sparsity=0.5, targets=[3])


def test_excluding_everything_leaves_nothing_to_prune():
    with pytest.raises(SecateursError, match="no prunable weight"):
        Pruner(nn.Linear(4, 4), sparsity=0.5, exclude=[nn.Linear])


def test_not_a_model_is_refused():
    with pytest.raises(SecateursError, match="model: got dict"):
        Pruner({}, sparsity=0.5)


def test_attach_refuses_a_non_optimizer():
    with pytest.raises(SecateursError, match="optimizer: got list"):
        Pruner(nn.Linear(4, 4), sparsity=0.5).attach([])
