"""What ``secateurs prune`` does: load, read data, measure, prune, measure, write, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from secateurs.errors import check, check_choice, check_fraction, check_int, config_keys

__all__ = ["OPTION_NAMES", "list_targets", "prune_pretrained"]

OPTION_NAMES = {
    "model": "MODEL", "calibration": "--calibration", "method": "--method", "sparsity": "--sparsity",
    "pattern": "--pattern", "group": "--group", "owl": "--owl", "damping": "--damping", "refine": "--refine", "targets": "--target",
    "exclude": "--exclude", "seq_len": "--seq-len", "samples": "--samples", "batch_size": "--batch-size",
}
"""Library argument -> the CLI option a user typed, for error messages."""


def list_targets(model: str, *, factory: str | None, targets: list[str] | None, exclude: list[str]) -> list[dict[str, Any]]:
    """The weights ``secateurs prune`` would prune in ``model`` (``--dry-run``), in model order."""
    from secateurs import prune
    from secateurs.pretrained.models import load_model, quiet_transformers

    with quiet_transformers():
        loaded = load_model(model, factory)
    with config_keys("--", OPTION_NAMES):
        chosen = prune.find_targets(loaded.model, targets or None, exclude)
    return [{"name": t.name, "layer": type(t.module).__name__, "shape": list(t.shape), "params": t.numel} for t in chosen]


def prune_pretrained(
    model: str, *, calibration: Path | None, evaluation: Path | None, method: str, sparsity: float | None,
    pattern: str | None, group: str, owl: bool, damping: float, factory: str | None, exclude: list[str],
    seq_len: int, samples: int, batch_size: int, out: Path, progress: bool, targets: list[str] | None = None,
    refine: int = 0,
) -> dict[str, Any]:
    """Prune ``model`` and write it with its report into ``out`` (which must not exist yet).
    ``refine`` is :func:`secateurs.prune.oneshot`'s (SparseGPT only)."""
    from secateurs import prune
    from secateurs.pretrained.models import quiet_transformers

    with config_keys("--", OPTION_NAMES):
        check_choice(method, "method", prune.calibration.METHODS)
        check_choice(group, "group", prune.calibration.GROUPS)
        if sparsity is not None:
            check_fraction(sparsity, "sparsity")
        prune.selection.parse_pattern(pattern)
        check(sparsity is not None or pattern is not None, "sparsity", sparsity, "a number in [0, 1), or --pattern N:M")
        for value, name in ((seq_len, "seq_len"), (samples, "samples"), (batch_size, "batch_size")):
            check_int(value, name, minimum=1)
        check_int(refine, "refine", minimum=0)
        check(not refine or method == "sparsegpt", "refine", refine, "0, or a number of iterations with --method sparsegpt")
        check(calibration is not None or (method == "magnitude" and not owl), "calibration", None,
              f"a data file or image folder: {method if method != 'magnitude' else '--owl'} needs calibration data")
    check(not out.exists(), "--out", str(out), "a folder that does not exist yet (nothing is overwritten)")
    with quiet_transformers():
        return _prune(model, calibration, evaluation, method, sparsity, pattern, group, owl, damping, factory,
                      targets, exclude, seq_len, samples, batch_size, out, progress, refine)


def _prune(
    model: str, calibration: Path | None, evaluation: Path | None, method: str, sparsity: float | None,
    pattern: str | None, group: str, owl: bool, damping: float, factory: str | None, targets: list[str] | None,
    exclude: list[str], seq_len: int, samples: int, batch_size: int, out: Path, progress: bool, refine: int,
) -> dict[str, Any]:
    from secateurs import prune
    from secateurs.pretrained.data import read_batches
    from secateurs.pretrained.models import load_model
    from secateurs.pretrained.quality import agreement, observe
    from secateurs.pretrained.report import write_report

    loaded = load_model(model, factory)
    read = {"tokenizer": loaded.tokenizer, "causal": loaded.causal_lm, "seq_len": seq_len, "batch_size": batch_size}
    batches = None if calibration is None else read_batches(calibration, field="--calibration", samples=samples, **read)
    eval_batches = None if evaluation is None else read_batches(evaluation, field="--eval", samples=max(samples, 1000), **read)
    dense = None if eval_batches is None else observe(loaded.model, eval_batches, causal=loaded.causal_lm)
    with config_keys("--", OPTION_NAMES):
        result = prune.oneshot(
            loaded.model, batches, method=method, sparsity=sparsity, pattern=pattern, group=group, owl=owl,
            damping=damping, targets=targets or None, exclude=exclude, progress=progress, refine=refine,
        )
    quality: dict[str, Any] = {}
    if dense is not None and eval_batches is not None:
        pruned = observe(loaded.model, eval_batches, causal=loaded.causal_lm)
        quality = {"dense": dense.summary(), "pruned": pruned.summary(), "agreement": agreement(dense, pruned)}
    header = {
        "model": str(model), "format": loaded.kind, "method": method, "pattern": pattern, "group": group,
        "owl": owl, "damping": damping, "refine": refine, "calibration": None if calibration is None else str(calibration),
        "eval": None if evaluation is None else str(evaluation), "samples": samples, "seq_len": seq_len,
        "targets": list(targets or []), "exclude": list(exclude),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = loaded.save(staging)
        write_report(staging, result, header, quality)
        os.replace(staging, out)  # all or nothing: the folder appears complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"result": result, "quality": quality, "written": written}
