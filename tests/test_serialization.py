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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_take_the_process_umask_like_any_new_file(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        save_state(tmp_path / "state.safetensors", {"w": torch.ones(2)})
        (tmp_path / "plain.txt").write_text("x")  # the reference: an ordinary open()
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("report.md", "state.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_canonical_header_sorts_metadata_and_keeps_offsets_and_tensors() -> None:
    import json

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from secateurs.serialization import canonical_header

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16)}
    raw = st_save(tensors, metadata={"z": "1", "a": "2", "m": "3"})
    fixed = canonical_header(raw)
    assert len(fixed) == len(raw) and fixed[8 + int.from_bytes(raw[:8], "little"):] == raw[8 + int.from_bytes(raw[:8], "little"):]
    header = json.loads(fixed[8 : 8 + int.from_bytes(fixed[:8], "little")])
    assert list(header) == ["__metadata__", *sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])]
    assert list(header["__metadata__"]) == ["a", "m", "z"]
    back = st_load(fixed)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
