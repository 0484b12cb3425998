"""Fuzzing: any config ends in a valid run set-up or a clear error; any small model prunes or
gives a clear error. Never a traceback of another kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.experiment.config import RunConfig, validate
from secateurs.experiment.run import Run

SECTION_KEYS = {
    section: list(model.model_fields)
    for section, model in ((name, RunConfig.model_fields[name].annotation) for name in ("data", "model", "train", "clip", "prune"))
}
SCALARS = st.one_of(
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["digits", "sequence", "mlp", "rnn", "none", "agc", "zclip", "2:4", "1:0", "magnitude", "structured", "é✂️"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        section = draw(st.sampled_from([*SECTION_KEYS, "seed", "unknown_section"]))
        if section in ("seed", "unknown_section"):
            data[section] = draw(VALUES)
            continue
        key = draw(st.one_of(st.sampled_from(SECTION_KEYS[section]), st.text(min_size=1, max_size=8)))
        data.setdefault(section, {})[key] = draw(VALUES)
    return data


@settings(max_examples=300, deadline=None)
@given(config_dicts())
def test_any_config_dict_validates_or_is_one_clear_line(data: dict[str, Any]) -> None:
    try:
        validate(data)
    except SecateursError as exc:
        assert str(exc) and "\n" not in str(exc)


SMALL_RUN = {"train": {"epochs": 0}, "prune": {"epochs": 1, "finetune_epochs": 0}, "data": {"limit": 200}}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(["mlp", "seed-cnn", "lstm", "rnn", "transformer", "mobilenet"]),
    criterion=st.sampled_from(list(prune.CRITERIA)),
    sparsity=st.floats(0, 0.99),
    scope=st.sampled_from(["global", "layer"]),
    pattern=st.sampled_from(["", "2:4", "1:8"]),
    per_layer=st.dictionaries(st.sampled_from(["nope", "fc", "classifier.1", "net.1"]), st.floats(0, 0.95), max_size=2),
)
def test_valid_configs_set_up_a_run_or_fail_clearly(tmp_path: Path, model: str, criterion: str, sparsity: float, scope: str, pattern: str, per_layer: dict[str, float]) -> None:
    data = {**SMALL_RUN, "model": {"name": model}}
    data["prune"] = {**SMALL_RUN["prune"], "criterion": criterion, "sparsity": sparsity, "scope": scope, "pattern": pattern, "per_layer": per_layer}
    try:
        cfg = validate(data)
        run = Run(cfg, tmp_path, progress=False)
        assert run.pruner is not None
        run._prune_tick()
    except SecateursError as exc:
        assert "\n" not in str(exc)


class RandomNet(nn.Module):
    """A random mix of the layer kinds secateurs prunes: Linear, Conv, RNN/LSTM/GRU, attention."""

    def __init__(self, kind: str, width: int, depth: int, heads: int):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            layers: list[nn.Module] = []
            c = 3
            for _ in range(depth):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif kind in ("rnn", "lstm", "gru"):
            self.body = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](6, width, num_layers=depth, batch_first=True)
        elif kind == "attention":
            self.embed = nn.Linear(6, width * heads)
            self.body = nn.MultiheadAttention(width * heads, heads, batch_first=True)
            width = width * heads
        else:
            layers, w = [], 6
            for _ in range(depth):
                layers += [nn.Linear(w, width), nn.ReLU()]
                w = width
            self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 3)

    def example(self) -> torch.Tensor:
        return torch.randn(2, 3, 8, 8) if self.kind == "conv" else torch.randn(2, 5, 6) if self.kind != "mlp" else torch.randn(2, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("rnn", "lstm", "gru"):
            return self.head(self.body(x)[0][:, -1])
        if self.kind == "attention":
            h = self.embed(x)
            return self.head(self.body(h, h, h, need_weights=False)[0].mean(1))
        return self.head(self.body(x))


NETS = st.builds(
    RandomNet,
    kind=st.sampled_from(["mlp", "conv", "rnn", "lstm", "gru", "attention"]),
    width=st.integers(1, 12),
    depth=st.integers(1, 3),
    heads=st.integers(1, 3),
)


@settings(max_examples=40, deadline=None)
@given(net=NETS, sparsity=st.floats(0, 0.99), criterion=st.sampled_from(["magnitude", "random", "synflow"]), scope=st.sampled_from(["global", "layer"]))
def test_random_models_through_pruner_reach_the_target_or_fail_clearly(net: RandomNet, sparsity: float, criterion: str, scope: str) -> None:
    x = net.example()
    try:
        pruner = prune.Pruner(net, sparsity=sparsity, criterion=criterion, scope=scope)
        if pruner.requires_data:
            pruner.score([(x, torch.zeros(len(x), dtype=torch.long))], nn.functional.cross_entropy)
        achieved = pruner.step()
    except SecateursError as exc:
        assert "\n" not in str(exc)
        return
    masks = pruner.masks
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs((1 - kept / total) - achieved) < 1e-9
    if scope == "global":
        assert achieved == pytest.approx(sparsity, abs=max(1.5 / total, 1e-6))
    else:  # each weight tensor pruned on its own, to the nearest whole count
        for target in pruner.targets:
            pruned = int((~masks[target.name]).sum())
            assert pruned == int(sparsity * target.numel + 0.5), target.name
    for target in pruner.targets:  # the masks are applied, not only computed
        assert not target.param.detach()[~masks[target.name]].any(), target.name
    assert net(x).shape == (len(x), 3)


@settings(max_examples=30, deadline=None)
@given(net=NETS, ratio=st.floats(0.05, 0.95), scope=st.sampled_from(["global", "layer"]))
def test_random_models_through_structured_shrink_or_fail_clearly(net: RandomNet, ratio: float, scope: str) -> None:
    x = net.example()
    before = sum(p.numel() for p in net.parameters())
    try:
        small = prune.structured(net, x, sparsity=ratio, scope=scope)
    except SecateursError as exc:
        assert "\n" not in str(exc)
        return
    assert small(x).shape == (len(x), 3)
    assert sum(p.numel() for p in small.parameters()) <= before
