"""What ``secateurs prune --kind structured`` does: whole heads and MLP neurons out of a Hugging
Face Transformer (:func:`secateurs.prune.structured_transformer`), an optional recovery step
(:func:`secateurs.recovery.distill`, clipped by a :mod:`secateurs.clip` rule), and the folder
written in the model's own format, which stock ``from_pretrained`` loads, with ``report.json`` /
``report.md``: all at once, or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from secateurs.errors import (
    SecateursError,
    check,
    check_choice,
    check_fraction,
    check_int,
    check_positive,
    config_keys,
)

__all__ = ["STRUCTURED_OPTIONS", "prune_structured_pretrained"]

STRUCTURED_OPTIONS = {
    "model": "MODEL", "calibration": "--calibration", "sparsity": "--sparsity", "heads": "--heads",
    "neurons": "--neurons", "criterion": "--criterion", "reconstruct": "--reconstruct", "steps": "--recover-steps",
    "lr": "--recover-lr", "rule": "--clip", "hidden": "--hidden", "seq_len": "--seq-len", "samples": "--samples", "batch_size": "--batch-size",
}
"""Library argument -> the CLI option a user typed, for error messages."""


def prune_structured_pretrained(
    model: str, *, calibration: Path | None, evaluation: Path | None, sparsity: float | None, heads: float | None,
    neurons: float | None, criterion: str, reconstruct: str | None, recover_steps: int, recover_lr: float,
    clip_rule: str, max_norm: float, seq_len: int, samples: int, batch_size: int, out: Path,
    hidden: float | None = None,
) -> dict[str, Any]:
    """Prune ``model`` (a Hugging Face folder) structurally and write it with its report into
    ``out`` (which must not exist yet); returns the pruning record, the quality and the files."""
    from secateurs import clip, prune
    from secateurs.pretrained.models import quiet_transformers
    from secateurs.prune.surgery.transformer import RECONSTRUCT

    with config_keys("--", STRUCTURED_OPTIONS):
        check(sparsity is not None or heads is not None or neurons is not None, "sparsity", None,
              "a fraction in (0, 1) of the heads and MLP neurons removed (or --heads / --neurons)")
        if sparsity is not None:
            check_fraction(sparsity, "sparsity", low_open=True)
        check_choice(criterion, "criterion", prune.UNIT_CRITERIA)
        if reconstruct is not None:
            check_choice(reconstruct, "reconstruct", RECONSTRUCT)
        check_int(recover_steps, "steps", minimum=0)
        check_positive(recover_lr, "lr")
        check_choice(clip_rule, "rule", clip.METHODS)
        for value, name in ((seq_len, "seq_len"), (samples, "samples"), (batch_size, "batch_size")):
            check_int(value, name, minimum=1)
        needs = prune.UNIT_CRITERIA[criterion].needs_data or prune.UNIT_CRITERIA[criterion].needs_grad
        check(calibration is not None or not (needs or reconstruct or recover_steps), "calibration", None,
              "a text / JSONL / tensor file: the criterion, --reconstruct and --recover-steps read calibration data")
    check(not out.exists(), "--out", str(out), "a folder that does not exist yet (nothing is overwritten)")
    with quiet_transformers():
        return _run(model, calibration, evaluation, sparsity, heads, neurons, criterion, reconstruct, recover_steps,
                    recover_lr, clip_rule, max_norm, seq_len, samples, batch_size, out, hidden)


def _run(
    model: str, calibration: Path | None, evaluation: Path | None, sparsity: float | None, heads: float | None,
    neurons: float | None, criterion: str, reconstruct: str | None, recover_steps: int, recover_lr: float,
    clip_rule: str, max_norm: float, seq_len: int, samples: int, batch_size: int, out: Path,
    hidden: float | None = None,
) -> dict[str, Any]:
    from secateurs import clip, prune
    from secateurs.pretrained.data import read_batches
    from secateurs.pretrained.models import load_model
    from secateurs.pretrained.quality import agreement, observe
    from secateurs.recovery import distill

    loaded = load_model(model)
    check(loaded.kind == "hf", "model", model, "a Hugging Face model folder (structured pruning rewrites its config)")
    read = {"tokenizer": loaded.tokenizer, "causal": loaded.causal_lm, "seq_len": seq_len, "batch_size": batch_size}
    batches = None if calibration is None else read_batches(calibration, field="--calibration", samples=samples, **read)
    eval_batches = None if evaluation is None else read_batches(evaluation, field="--eval", samples=max(samples, 1000), **read)
    dense_model = loaded.model
    with config_keys("--", STRUCTURED_OPTIONS):
        small = prune.structured_transformer(dense_model, sparsity=sparsity, heads=heads, neurons=neurons,
                                             criterion=criterion, calibration=batches, reconstruct=reconstruct,
                                             hidden=hidden)
    try:
        prune.check_pretrained(small)
    except SecateursError as err:
        raise SecateursError(f"--heads: {err}; pass --heads 0 to remove MLP neurons only", field="--heads") from None
    log = None
    if recover_steps:
        rule = None
        if clip_rule != clip.NONE:
            params = {"max_norm": max_norm} if "max_norm" in clip.RULES.parameters(clip_rule) else {}
            with config_keys("--", {"max_norm": "--max-norm"}):
                rule = clip.build(clip_rule, **params)
        assert batches is not None
        with config_keys("--", STRUCTURED_OPTIONS):
            done = distill(small, dense_model, batches, steps=recover_steps, lr=recover_lr, rule=rule)
        log = {"steps": recover_steps, "first_loss": done.losses[0], "last_loss": done.losses[-1],
               "clipped_steps": done.log.clipped_steps, "skipped_steps": done.log.skipped_steps, "rule": clip_rule}
    quality: dict[str, Any] = {}
    if eval_batches is not None:
        dense = observe(dense_model, eval_batches, causal=loaded.causal_lm)
        pruned = observe(small, eval_batches, causal=loaded.causal_lm)
        quality = {"dense": dense.summary(), "pruned": pruned.summary(), "agreement": agreement(dense, pruned)}
    record = prune.pruning_record(small) or {}
    report = {"model": str(model), "kind": "structured", "criterion": criterion, "reconstruct": reconstruct,
              "sparsity": record.get("sparsity"), "config": _shape_fields(small), "recovery": log, "quality": quality,
              "parts": {k: {"units": v["units"], "kept": v["kept"]} for k, v in record.get("parts", {}).items()}}
    loaded.model = small
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = loaded.save(staging)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(_markdown(report))
        os.replace(staging, out)  # all or nothing: the folder appears complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"record": record, "quality": quality, "recovery": log, "written": written}


def _shape_fields(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
             "attention_bias", "mlp_bias")
    return {n: getattr(config, n) for n in names if config is not None and hasattr(config, n)}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Structured pruning of {report['model']}", "",
             f"criterion {report['criterion']}, reconstruct {report['reconstruct']}, "
             f"{report['sparsity']:.1%} of the heads and neurons removed", "", "| config field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in report["config"].items()]
    if report["recovery"]:
        r = report["recovery"]
        lines += ["", f"recovery: {r['steps']} distillation steps ({r['rule']}, {r['clipped_steps']} clipped), "
                      f"loss {r['first_loss']:.4g} -> {r['last_loss']:.4g}"]
    for key, value in report["quality"].get("agreement", {}).items():
        lines.append(f"- {key}: {value:.4f}")
    return "\n".join(lines) + "\n"
