"""Atomic writes and code-free state files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.serialization import atomic_write_text, load_state, save_state


def test_state_tree_round_trips_exactly(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tree = {"opt": opt.state_dict(), "rng": torch.get_rng_state(), "t": (1, 2.5, None, "x"), "l": [True]}
    save_state(tmp_path / "s.safetensors", tree)
    back = load_state(tmp_path / "s.safetensors")
    assert back["t"] == (1, 2.5, None, "x") and back["l"] == [True]
    assert torch.equal(back["rng"], tree["rng"])
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(back["opt"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][k], v)


def test_truncated_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.arange(1000.0)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SecateursError, match="corrupted"):
        load_state(path)


def test_pickle_is_not_a_state_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(SecateursError, match="not a secateurs state file"):
        load_state(path)


def test_failed_atomic_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    real_replace = os.replace

    def failing_replace(src: str, dst: str) -> None:
        raise Boom

    os.replace = failing_replace  # type: ignore[assignment]
    try:
        with pytest.raises(Boom):
            atomic_write_text(path, "new")
    finally:
        os.replace = real_replace  # type: ignore[assignment]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
