"""Config: defaults, TOML files, --set overrides, and one-line errors naming field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from secateurs.errors import SecateursError
from secateurs.experiment.config import apply_override, load_config, parse_value, to_toml


def test_defaults_are_the_documented_default_job() -> None:
    cfg = load_config()
    assert (cfg.data.name, cfg.model.name, cfg.train.optimizer) == ("digits", "seed-cnn", "adamw")
    assert (cfg.clip.method, cfg.clip.params()) == ("global_norm", {"max_norm": 1.0})
    assert (cfg.prune.criterion, cfg.prune.scope, cfg.prune.sparsity) == ("magnitude", "global", 0.9)


def test_set_overrides_parse_toml_values() -> None:
    cfg = load_config(overrides=["prune.sparsity=0.8", "train.epochs=3", 'prune.per_layer={ "features.0" = 0.5 }', "sweep.seeds=[4, 5]"])
    assert cfg.prune.sparsity == 0.8
    assert cfg.train.epochs == 3
    assert cfg.prune.per_layer == {"features.0": 0.5}
    assert cfg.sweep.seeds == [4, 5]


def test_unquoted_string_values_are_strings() -> None:
    assert parse_value("magnitude") == "magnitude"
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True


def test_file_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("seed = 3\n[prune]\nsparsity = 0.5\n")
    cfg = load_config(path, ["prune.sparsity=0.7"])
    assert (cfg.seed, cfg.prune.sparsity) == (3, 0.7)


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(overrides=["clip.method=autoclip", "clip.percentile=25", "prune.pattern=2:4"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("prune.sparsity=1.5", "prune.sparsity", "1.5"),
        ("train.epochs=-1", "train.epochs", "-1"),
        ("prune.scope=everywhere", "prune.scope", "everywhere"),
        ("prune.pattern=4:2", "prune.pattern", "4:2"),
        ("train.lr=fast", "train.lr", "fast"),
        ("train.device=gpu", "train.device", "'gpu'"),
        ("train.device=cuda:x", "train.device", "'cuda:x'"),
        ("train.device=cuda:", "train.device", "'cuda:'"),
        ("train.device=CUDA", "train.device", "'CUDA'"),
        ("train.device=1", "train.device", "1"),
    ],
)
def test_bad_values_name_field_and_value(override: str, field: str, value: str) -> None:
    with pytest.raises(SecateursError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert field in message and value in message
    assert "\n" not in message


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(SecateursError, match=r"no_such.*unknown key; allowed keys here: seed, data"):
        load_config(overrides=["no_such.key=1"])
    with pytest.raises(SecateursError, match=r"prune.sparsty: unknown key; allowed keys here: kind, criterion"):
        load_config(overrides=["prune.sparsty=0.5"])


def test_unknown_clip_method_is_rejected_before_work() -> None:
    with pytest.raises(SecateursError, match="nonsense"):
        load_config(overrides=["clip.method=nonsense"])


def test_missing_file_and_bad_toml_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SecateursError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune\nsparsity = ")
    with pytest.raises(SecateursError, match="is not valid TOML"):
        load_config(bad)


def test_malformed_set_is_rejected() -> None:
    with pytest.raises(SecateursError, match="KEY=VALUE"):
        apply_override({}, "prune.sparsity")
    with pytest.raises(SecateursError, match="is a value, not a section"):
        apply_override({"seed": 1}, "seed.x=2")


def test_prune_threshold_is_checked_under_its_config_key() -> None:
    cfg = load_config(overrides=["prune.threshold=0.1", "prune.schedule=oneshot"])
    assert cfg.prune.threshold == 0.1
    assert "threshold" not in to_toml(load_config())  # unset: not written, the run prunes to prune.sparsity
    with pytest.raises(SecateursError, match=r"^prune\.threshold: got nan; allowed: a finite number"):
        load_config(overrides=["prune.threshold=nan", "prune.schedule=oneshot"])
    with pytest.raises(SecateursError, match=r"^prune\.threshold: got 0\.1 with prune\.schedule = 'agp'; allowed: prune\.schedule = 'oneshot'"):
        load_config(overrides=["prune.threshold=0.1"])


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_train_device_takes_every_documented_spelling(value: str) -> None:
    # the spelling is checked here; whether this machine has the device, when the run starts
    assert load_config(overrides=[f"train.device={value}"]).train.device == value


def test_a_bad_train_device_says_what_is_allowed() -> None:
    with pytest.raises(SecateursError) as err:
        load_config(overrides=["train.device=gpu"])
    assert str(err.value) == "train.device: got 'gpu'; allowed: auto, cpu, cuda, cuda:N (N a GPU index from 0), mps"
    assert load_config().train.device == "auto"
