"""build() from config names, and the errors a user gets for bad clipping arguments."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator

import pytest
import torch

from secateurs import clip
from secateurs.clip import (
    AGC,
    METHODS,
    RULES,
    AdaGC,
    AutoClip,
    ClipStats,
    GlobalNorm,
    Norm,
    Rule,
    Value,
    ZClip,
    agc_,
    build,
    by_global_norm_,
    by_norm_,
    by_value_,
    clamp_params_,
    register,
)
from secateurs.clip.registry import names, parameters
from secateurs.errors import SecateursError
from secateurs.experiment.config import load_config


def test_methods_lists_every_buildable_rule() -> None:
    assert set(METHODS) == {
        "none",
        "value",
        "norm",
        "global_norm",
        "agc",
        "autoclip",
        "zclip",
        "adagc",
    }


@pytest.mark.parametrize(
    ("method", "params", "cls"),
    [
        ("value", {"clip_value": 0.5}, Value),
        ("norm", {"max_norm": 2.0, "norm_type": "inf"}, Norm),
        ("global_norm", {"max_norm": 1.0}, GlobalNorm),
        ("agc", {}, AGC),
        ("autoclip", {"percentile": 5}, AutoClip),
        ("zclip", {"z_thresh": 3.0}, ZClip),
        ("adagc", {"warmup_steps": 10}, AdaGC),
    ],
)
def test_build_makes_the_named_rule_with_its_parameters(
    method: str, params: dict, cls: type
) -> None:
    rule = build(method, **params)
    assert type(rule) is cls and rule.method == method
    for name, value in params.items():
        expected = math.inf if value == "inf" else value
        assert getattr(rule, name) == expected


def test_build_none_gives_no_rule() -> None:
    assert build("none") is None


def test_unknown_method_names_the_argument_and_the_choices() -> None:
    with pytest.raises(SecateursError, match=r"^method: got 'clipnorm'; allowed: none, value, ") as err:
        build("clipnorm")
    assert err.value.field == "method"


def test_unknown_parameter_names_it_and_the_accepted_ones() -> None:
    with pytest.raises(
        SecateursError,
        match=r"^max_nrom: got 1\.0; allowed: parameters of clip rule 'global_norm': max_norm, norm_type$",
    ):
        build("global_norm", max_nrom=1.0)


def test_missing_required_parameter_is_named() -> None:
    with pytest.raises(SecateursError, match=r"^max_norm: got None; .*required by clip rule 'global_norm'"):
        build("global_norm")


def test_parameters_given_with_method_none_are_rejected() -> None:
    with pytest.raises(SecateursError, match=r"^max_norm: got 1\.0; allowed: no parameters with method 'none'"):
        build("none", max_norm=1.0)


def test_bad_value_through_build_names_the_python_argument() -> None:
    with pytest.raises(SecateursError, match=r"^max_norm: got -1; allowed: a number > 0$") as err:
        build("norm", max_norm=-1)
    assert err.value.field == "max_norm"


def test_parameters_lists_the_constructor_arguments_with_defaults() -> None:
    assert parameters("global_norm") == {"max_norm": inspect.Parameter.empty, "norm_type": 2.0}
    with pytest.raises(SecateursError, match=r"^method: got 'nope'"):
        parameters("nope")


def test_names_and_rules_agree_with_methods() -> None:
    assert names() == tuple(RULES) == tuple(METHODS)[1:]
    assert RULES["zclip"] is ZClip and all(RULES[m].method == m for m in RULES)


class _Halve(Rule):
    """A user's own rule: halves every gradient."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def clip(self, params: list[torch.Tensor]) -> ClipStats:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.factor)
        zero = torch.zeros(())
        return ClipStats(zero, zero, zero, torch.tensor(True))


@pytest.fixture
def halve() -> Iterator[type[Rule]]:
    cls = register("halve")(_Halve)
    yield cls
    RULES.unregister("halve")


def test_a_registered_user_rule_shows_in_methods_and_builds(halve: type[Rule]) -> None:
    assert "halve" in METHODS and METHODS[-1] == "halve" and len(METHODS) == len(RULES) + 1
    assert "halve" in set(METHODS) and "halve" in clip.METHODS
    rule = build("halve", factor=0.25)
    assert isinstance(rule, halve) and rule.method == "halve" and rule.factor == 0.25
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 4.0)
    rule([p])
    assert p.grad.tolist() == [1.0, 1.0]


def test_an_unregistered_rule_leaves_methods(halve: type[Rule]) -> None:
    RULES.unregister("halve")
    assert "halve" not in METHODS and "halve" not in set(METHODS)
    register("halve")(halve)  # for the fixture's clean-up


def test_registering_a_taken_name_is_refused_unless_replace(halve: type[Rule]) -> None:
    class Other(_Halve):
        pass

    with pytest.raises(SecateursError, match=r"^name: got 'halve', already registered"):
        register("halve")(Other)
    assert RULES["halve"] is halve
    with pytest.raises(SecateursError, match=r"^name: got 'global_norm', already registered"):
        register("global_norm")(Other)
    assert register("halve", replace=True)(Other) is Other
    assert RULES["halve"] is Other and Other.method == "halve"


def test_none_cannot_be_registered() -> None:
    with pytest.raises(SecateursError, match=r"^name: got 'none'"):
        register("none")(_Halve)
    assert "none" not in RULES


def test_methods_is_read_only_and_compares_like_a_tuple() -> None:
    assert tuple(METHODS) == METHODS and METHODS[0] == "none"
    assert list(METHODS) == ["none", *RULES]
    with pytest.raises(TypeError):
        METHODS[0] = "x"  # type: ignore[index]


def test_the_config_layer_names_the_config_key() -> None:
    with pytest.raises(SecateursError, match=r"^clip\.max_norm: got -1; allowed: a number > 0$") as err:
        load_config(overrides=["clip.method=norm", "clip.max_norm=-1"])
    assert err.value.field == "clip.max_norm"
    with pytest.raises(SecateursError, match=r"^clip\.method: got 'clipnorm'; allowed: none, "):
        load_config(overrides=["clip.method=clipnorm"])
    with pytest.raises(SecateursError, match=r"clip\.max_norm: got 0"):
        load_config(overrides=['sweep.clip_methods=[{method = "norm", max_norm = 0}]'])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: GlobalNorm(-1.0), "max_norm"),
        (lambda: Norm(0.0), "max_norm"),
        (lambda: Value(-0.1), "clip_value"),
        (lambda: AutoClip(percentile=0), "percentile"),
        (lambda: AutoClip(percentile=100.5), "percentile"),
        (lambda: AutoClip(history=0), "history"),
        (lambda: GlobalNorm(1.0, norm_type="l2"), "norm_type"),
        (lambda: GlobalNorm(1.0, norm_type=0.5), "norm_type"),
        (lambda: ZClip(alpha=1.0), "alpha"),
        (lambda: ZClip(clip_option="median"), "clip_option"),
        (lambda: ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: AGC(clipping=-0.01), "clipping"),
        (lambda: AdaGC(beta=1.0), "beta"),
        (lambda: GlobalNorm(True), "max_norm"),  # bools are not numbers here
        (lambda: AGC(fused="yes"), "fused"),
        (lambda: AutoClip(cuda_graph=1), "cuda_graph"),
        (lambda: ZClip(cuda_graph=None), "cuda_graph"),
    ],
)
def test_bad_rule_argument_raises_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(SecateursError, match=rf"^{field}: got "):
        make()


def test_percentile_of_100_is_allowed() -> None:
    assert AutoClip(percentile=100).percentile == 100.0


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda p: by_global_norm_(p, -1.0), "max_norm"),
        (lambda p: by_global_norm_(p, 1.0, norm_type="euclid"), "norm_type"),
        (lambda p: by_norm_(p, 0.0), "max_norm"),
        (lambda p: by_value_(p, -2.0), "clip_value"),
        (lambda p: agc_(p, clipping=0.0), "clipping"),
        (lambda p: agc_(p, fused=1), "fused"),
        (lambda p: clamp_params_(p, 1.0, -1.0), "min"),
        (lambda p: clamp_params_(p), "min/max"),
    ],
)
def test_bad_function_argument_raises_naming_the_field(
    call: Callable[[list[torch.Tensor]], object], field: str
) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(SecateursError, match=rf"^{field}: got "):
        call([p])
    assert torch.equal(p.grad, torch.ones(2)) and torch.equal(p.detach(), torch.ones(2))


def test_gpu_path_switches_show_in_the_repr_only_when_set_and_build_from_a_config() -> None:
    assert repr(AGC()) == "AGC(clipping=0.01, eps=0.001)"
    assert repr(build("agc", fused=False)) == "AGC(clipping=0.01, eps=0.001, fused=False)"
    rule = build("autoclip", cuda_graph=False)
    assert repr(rule).endswith("cuda_graph=False)") and rule.cuda_graph is False
    assert "cuda_graph" not in repr(ZClip()) and ZClip().cuda_graph is True


def test_fused_true_without_triton_names_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    from secateurs.clip import unitwise

    monkeypatch.setattr(unitwise, "_FUSED", [None])  # as if importing Triton had failed
    monkeypatch.setattr(unitwise, "_interpreting", lambda: True)  # CPU tensors would take it
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.ones(4, 4)
    with pytest.raises(SecateursError, match=r"^fused: got True; allowed: False or None \(fused=True needs Triton"):
        agc_([p], fused=True)
    assert agc_([p], fused=None) is not None  # the per-tensor path still runs
