"""The README's Python quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def test_quick_start_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code.group(1), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "steps clipped" in out and "| **total** |" in out and "90.00%" in out
    assert (tmp_path / "model.safetensors").is_file()


def _layout() -> dict[str, str]:
    """README's layout table: the first cell's `src/secateurs/...` paths -> the row's text."""
    text = README.read_text()
    table = text.split("## Layout", 1)[1].strip().split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        where, what = line.strip("|").split("|", 1)
        paths = re.findall(r"`([^`]+)`", where)
        folder = paths[0].rsplit("/", 1)[0] + "/" if not paths[0].endswith("/") else paths[0]
        for path in paths:
            rows[path if "/" in path else folder + path] = what
    return rows


def test_layout_table_matches_the_tree() -> None:
    root = README.parent
    rows = _layout()
    for path in rows:
        assert (root / path).exists(), f"README's layout names {path}, which does not exist"
    package = root / "src" / "secateurs"
    for entry in package.iterdir():
        if entry.name.startswith("_") or entry.name == "__pycache__":
            continue
        name = f"src/secateurs/{entry.name}" + ("/" if entry.is_dir() else "")
        assert name in rows, f"README's layout table does not mention {name}"
    shims = {"structured_criteria", "structured_io", "structured_layers"}  # deprecated aliases
    for folder in ("clip", "prune", "prune/surgery", "prune/calibration", "pretrained", "experiment"):
        described = rows[f"src/secateurs/{folder}/"]
        for module in (package / folder).glob("*.py"):
            if module.stem.startswith("__") or module.stem in shims:
                continue
            assert f"`{module.stem}`" in described, f"README's layout row for {folder}/ does not name {module.stem}"
