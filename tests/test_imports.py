"""The layering of the package, read from its source: clip and prune do not import each other,
the library never imports the experiment layer or the CLI, and ``import secateurs.clip`` pulls
in nothing it does not use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import secateurs

SRC = Path(secateurs.__file__).resolve().parent.parent  # the folder holding secateurs/

# (importing module prefix, imported module prefix): an import of the second by the first is a
# layering error. Prefixes end at a dot boundary ("secateurs.prune" is not "secateurs.prune_x").
LIBRARY = (
    "secateurs.clip",
    "secateurs.prune",
    "secateurs.measure",
    "secateurs.serialization",
    "secateurs.errors",
    "secateurs.registry",
)
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("secateurs.clip", "secateurs.prune"),
    ("secateurs.prune", "secateurs.clip"),
    *((lib, upper) for lib in LIBRARY for upper in ("secateurs.experiment", "secateurs.cli")),
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """Dotted name of the module at ``path`` under ``root``, and whether it is a package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[-1] == "__init__"
    if package:
        parts.pop()
    return ".".join(parts), package


def _imported(tree: ast.AST, module: str, package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every module the source imports, in any form.

    ``from a import b`` counts as importing both ``a`` and ``a.b`` (``b`` may be a submodule);
    relative imports are resolved against ``module``; ``importlib.import_module("x")`` and
    ``__import__("x")`` with a literal name count too. Imports under ``if TYPE_CHECKING:`` count
    as well: they are a dependency of the source all the same.
    """
    base = module.split(".") if package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            found.extend((node.lineno, f"{source}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def layering_errors(root: Path) -> list[str]:
    """Every forbidden import in the ``secateurs`` package under ``root``, as ``file:line: ...``."""
    errors: list[str] = []
    for path in sorted((root / "secateurs").rglob("*.py")):
        module, package = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imported(tree, module, package):
            for importer, imported in FORBIDDEN:
                if _within(module, importer) and _within(name, imported):
                    where = path.relative_to(root).as_posix()
                    errors.append(f"{where}:{line}: {module} imports {name} ({importer} must not import {imported})")
                    break
    return errors


def test_library_layers_import_only_downwards() -> None:
    assert layering_errors(SRC) == []


def test_the_layering_check_reports_every_form_of_a_forbidden_import(tmp_path: Path) -> None:
    files = {
        "secateurs/__init__.py": "",
        "secateurs/errors.py": "import secateurs.cli\n",
        "secateurs/measure.py": "from secateurs.experiment import config\n",
        "secateurs/clip/__init__.py": "from . import rules\nfrom secateurs import errors\n",
        "secateurs/clip/rules.py": textwrap.dedent(
            """\
            import torch
            import secateurs.prune
            from secateurs.prune.mask import Mask
            from secateurs import prune
            from ..prune import criteria
            from .. import prune as p
            from secateurs.prune_helpers import ok  # another package, not secateurs.prune
            """
        ),
        "secateurs/clip/late.py": textwrap.dedent(
            """\
            import importlib
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from secateurs.prune.pruner import Pruner
            def later():
                return importlib.import_module("secateurs.prune")
            """
        ),
        "secateurs/prune/__init__.py": "from .pruner import Pruner\n",
        "secateurs/prune/pruner.py": "from secateurs.clip.wrap import ClippedOptimizer\nfrom ..clip import wrap\n",
        "secateurs/prune/surgery/__init__.py": "from ... import cli\n",
        "secateurs/experiment/run.py": "from secateurs import clip, prune, cli\n",  # allowed up here
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    reported = {(e.split(":")[0], e.split(":")[1]) for e in layering_errors(tmp_path)}
    assert reported == {
        ("secateurs/errors.py", "1"),
        ("secateurs/measure.py", "1"),
        *(("secateurs/clip/rules.py", str(line)) for line in (2, 3, 4, 5, 6)),
        ("secateurs/clip/late.py", "4"),
        ("secateurs/clip/late.py", "6"),
        ("secateurs/prune/pruner.py", "1"),
        ("secateurs/prune/pruner.py", "2"),
        ("secateurs/prune/surgery/__init__.py", "1"),
    }


def _modules_after(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it must print one JSON object, returned here."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = ("torch_pruning", "matplotlib", "sklearn", "torch.distributed.tensor")


def test_import_clip_loads_no_pruning_plotting_or_dtensor_modules() -> None:
    code = textwrap.dedent(
        f"""\
        import json, sys
        import secateurs.clip
        from secateurs.clip._tensors import dtensor_type
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        layers = [m for m in sys.modules if m.split(".")[:2] in (
            ["secateurs", "prune"], ["secateurs", "experiment"], ["secateurs", "cli"])]
        before = dtensor_type()
        import torch.distributed.tensor as dt
        print(json.dumps({{"loaded": loaded, "layers": layers, "before": repr(before),
                           "after": dtensor_type() is dt.DTensor}}))
        """
    )
    seen = _modules_after(code)
    assert seen["loaded"] == []
    assert seen["layers"] == []
    # no DTensor can exist before torch.distributed.tensor is imported; once it is, it is seen
    assert seen["before"] == "None" and seen["after"] is True


def test_a_run_loads_no_timm_torchvision_or_dynamo_yet_timm_models_are_counted_as_torch_pruning_counts_them() -> None:
    """``secateurs run`` needs Torch-Pruning but not timm (which imports torchvision and
    torch._dynamo: about 3 s a process); Torch-Pruning's MAC rules for timm's attention still
    apply to a timm model built afterwards, as they do when timm is imported first."""
    count = textwrap.dedent(
        """\
        import timm, torch
        attention = timm.models.vision_transformer.Attention(64, num_heads=4)
        x = torch.zeros(2, 10, 64)
        """
    )
    ours = _modules_after(
        "import json, sys\n"
        "import secateurs.experiment.run, secateurs.prune, secateurs.measure, secateurs.cli\n"
        "loaded = [m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules]\n"
        + count
        + "from secateurs import measure\n"
        "print(json.dumps({'loaded': loaded, 'macs': measure.count_macs(attention, x),\n"
        "                  'by_module': measure.count_macs_by_module(attention, x)[0]}))\n"
    )
    theirs = _modules_after(
        count + "import json, torch_pruning as tp\n"
        "print(json.dumps({'macs': tp.utils.count_ops_and_params(attention, x)[0]}))\n"
    )
    assert ours["loaded"] == []
    linears_only = 10 * (64 + 1) * (3 * 64 + 64)  # qkv and proj per example, with their biases
    assert ours["macs"] == ours["by_module"] == theirs["macs"] > linears_only  # the attention rule counted too
