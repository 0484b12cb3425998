"""One registry shape for mask and group criteria, and the old names that still work in 0.2."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.prune.criteria import Criterion, MagnitudeCriterion
from secateurs.prune.surgery.criteria import GroupCriterion, GroupMagnitude


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_a_registered_criterion_is_listed_and_usable_then_removed() -> None:
    @prune.register("abs_cubed")
    class Cubed(MagnitudeCriterion):
        def chunk(self, index: int, start: int, stop: int) -> torch.Tensor:
            return super().chunk(index, start, stop) ** 3

    try:
        assert "abs_cubed" in prune.CRITERIA and list(prune.CRITERIA)[-1] == "abs_cubed"
        assert Cubed.name == "abs_cubed"
        model = mlp()
        expected = model[0].weight.detach().abs() >= model[0].weight.detach().abs().flatten().sort().values[64]
        prune.Pruner(model, sparsity=0.5, criterion="abs_cubed", scope="layer", targets=["0"]).step()
        assert torch.equal(model[0].weight != 0, expected)
    finally:
        prune.CRITERIA.unregister("abs_cubed")
    assert "abs_cubed" not in prune.CRITERIA


def test_registering_a_taken_name_is_an_error_unless_replace() -> None:
    with pytest.raises(SecateursError, match=r"^name: got 'magnitude', already registered as a criterion by MagnitudeCriterion"):
        prune.register("magnitude")(type("Other", (Criterion,), {}))
    assert prune.CRITERIA["magnitude"] is MagnitudeCriterion
    with pytest.raises(SecateursError, match=r"^name: got 'magnitude', already registered as a group criterion"):
        prune.register_group_criterion("magnitude")(type("OtherGroup", (GroupCriterion,), {}))
    replacement = type("Replacement", (GroupMagnitude,), {})
    try:
        prune.register_group_criterion("magnitude", replace=True)(replacement)
        assert prune.GROUP_CRITERIA["magnitude"] is replacement
    finally:
        prune.register_group_criterion("magnitude", replace=True)(GroupMagnitude)


def test_unknown_names_list_what_is_registered() -> None:
    with pytest.raises(SecateursError, match=r"^criterion: got .l3.; allowed: magnitude, gradient"):
        prune.CRITERIA["l3"]
    with pytest.raises(SecateursError, match=r"^criterion: got .l3.; allowed: magnitude, bn_scale"):
        prune.GROUP_CRITERIA["l3"]


def test_bare_register_still_works_with_a_deprecation_warning() -> None:
    class Legacy(MagnitudeCriterion):
        name = "legacy_bare"

    with pytest.warns(DeprecationWarning, match=r'use @register\("name"\)'):
        prune.register(Legacy)
    try:
        assert prune.CRITERIA["legacy_bare"] is Legacy
    finally:
        prune.CRITERIA.unregister("legacy_bare")


def test_structured_old_argument_names_warn_and_give_the_same_model() -> None:
    x = torch.zeros(1, 8)
    new = prune.structured(mlp(), x, sparsity=0.5, exclude=[], max_layer_sparsity=0.9)
    with pytest.warns(DeprecationWarning, match=r"structured\(ratio=\.\.\.\) is deprecated .* use sparsity="):
        old = prune.structured(mlp(), x, ratio=0.5, ignore=[], max_layer_ratio=0.9)
    assert old[0].out_features == new[0].out_features == 8
    torch.testing.assert_close(old[0].weight, new[0].weight)


def test_structured_refuses_both_spellings_and_unknown_arguments() -> None:
    with pytest.raises(SecateursError, match=r"^ratio: got 0\.5 beside sparsity=0\.5"):
        prune.structured(mlp(), torch.zeros(1, 8), sparsity=0.5, ratio=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'amount'"):
        prune.structured(mlp(), torch.zeros(1, 8), amount=0.5)


@pytest.mark.parametrize(("old", "new"), [
    ("structured_criteria", "surgery.criteria"),
    ("structured_io", "surgery.checkpoint"),
    ("structured_layers", "surgery.layers"),
])
def test_old_module_paths_warn_and_export_the_same_names(old: str, new: str) -> None:
    sys.modules.pop(f"secateurs.prune.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = importlib.import_module(f"secateurs.prune.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
    current = importlib.import_module(f"secateurs.prune.{new}")
    assert legacy.__all__ == current.__all__
    assert all(getattr(legacy, name) is getattr(current, name) for name in current.__all__)


def test_run_help_lists_criteria_and_rules_registered_after_import() -> None:
    from typer.testing import CliRunner

    from secateurs import clip
    from secateurs.cli import app

    @prune.register("help_probe_criterion")
    class Probe(MagnitudeCriterion):
        pass

    @clip.register("help_probe_rule")
    class ProbeRule(clip.GlobalNorm):
        pass

    try:
        result = CliRunner().invoke(app, ["run", "--help"], terminal_width=400)
        assert result.exit_code == 0
        assert "help_probe_criterion" in result.output and "help_probe_rule" in result.output
    finally:
        prune.CRITERIA.unregister("help_probe_criterion")
        clip.RULES.unregister("help_probe_rule")
