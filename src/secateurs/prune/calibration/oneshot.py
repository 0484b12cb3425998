"""``oneshot``: prune a trained model once, from a few hundred calibration examples."""

from __future__ import annotations

import fnmatch
import inspect
import math
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from secateurs._memory import bounded_heap
from secateurs.errors import SecateursError, check, check_choice, check_fraction, check_int
from secateurs.prune.calibration.capture import (
    Batch,
    Streamed,
    Unit,
    calibrate,
    find_blocks,
    make_batches,
    plan_units,
)
from secateurs.prune.calibration.owl import OWL, outlier_ratio, owl_sparsities
from secateurs.prune.calibration.results import LayerResult, OneshotResult
from secateurs.prune.calibration.sparsegpt import sparsegpt
from secateurs.prune.calibration.stats import (
    InputStats,
    Recorder,
    matrix_run,
    set_weight_matrix,
    supports,
    weight_matrix,
)
from secateurs.prune.calibration.wanda import keep_mask, scores
from secateurs.prune.masks import Target, find_targets
from secateurs.prune.selection import parse_pattern, prune_lowest_

__all__ = ["GROUPS", "METHODS", "oneshot", "oneshot_streamed"]

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "activation")
"""``magnitude`` |w|; ``wanda`` |w| * ||x||; ``sparsegpt`` mask and weight update from the layer
Hessian; ``activation`` |w| * mean |x| (the seeds' criterion)."""

GROUPS: tuple[str, ...] = ("row", "layer", "global")
"""Where weights are compared: within each output row, within each layer, or over all of them."""



def oneshot(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    group: str = "row",
    owl: bool | OWL = False,
    sparsities: Mapping[str, float] | None = None,
    targets: Iterable[str | type[nn.Module]] | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
    damping: float = 0.01,
    block_size: int = 128,
    refine: int = 0,
    dense_targets: bool = False,
    offload: torch.device | str | None = None,
    progress: bool = False,
) -> OneshotResult:
    """Prune ``model`` in place, once, from ``calibration`` batches, block by block.

    Args:
        model: any module made of Linear / Conv layers (a Hugging Face model, a torchvision
            network); its dtype is kept, statistics are float32.
        calibration: batches of model inputs (tensors, tuples of positional inputs, mappings
            such as a tokenizer's output, whose ``attention_mask`` excludes padding from the
            statistics, or ``(inputs, labels)`` pairs). Not needed for ``magnitude``; with it,
            the report has every layer's reconstruction error.
        method: one of :data:`METHODS`.
        sparsity: fraction of every targeted weight to prune, in [0, 1).
        pattern: ``"N:M"``: keep N of every M consecutive input weights (then ``sparsity`` may
            be left out; it is ``1 - N/M``).
        group: one of :data:`GROUPS`. For sparsegpt, whose mask is chosen per block of 128
            columns, ``row`` prunes the same fraction of every row of the block, ``layer`` ranks
            the block's rows together (as published; 0.928 against 0.931 for ``row`` on MiniLM).
        owl: ``True`` or an :class:`OWL` for outlier-weighted per-layer sparsities.
        sparsities: module (or parameter) name or ``fnmatch`` pattern -> its own sparsity,
            taking precedence over ``sparsity`` and OWL.
        targets, exclude: the weights to prune, as for :class:`~secateurs.prune.Pruner`.
        damping: SparseGPT dampening, a fraction of ``mean(diag H)``; it grows tenfold while the
            Cholesky factorisation fails, and the result says so per layer.
        block_size: SparseGPT's column block.
        refine: SparseGPT only, beyond the paper: once a layer's mask is chosen, its kept
            weights are re-solved to the least-squares optimum for that mask (of the same
            objective SparseGPT minimises) by up to ``refine`` conjugate-gradient iterations
            (Boza 2024 does it by ADMM); see :mod:`~secateurs.prune.calibration.sparsegpt`.
            A few iterations do most of it on MiniLM: at 2:4, 1, 3 and 20 give 0.886, 0.898
            and 0.905 against 0.879 without (mean cosine, validation texts of
            ``bench/oneshot.py``); 3 add about a quarter to the pruning time.
        dense_targets: SparseGPT only, beyond the paper: every layer of a block is calibrated
            to reproduce the *dense* model's output ``W X_dense`` from its inputs in the partly
            pruned model, so that it corrects the error of what was pruned before it. The
            dense block runs beside the pruned one (a copy of one block, and the block's dense
            activations beside the pruned ones). Layers outside the blocks, and blocks whose
            inputs are not the previous block's outputs, keep the published target. On
            MiniLM at 2:4 it did not help (0.877 against 0.879; 0.893 against 0.905 with
            ``refine=30``).
        offload: device holding the calibration activations (e.g. ``"cpu"`` for a model on GPU).
        progress: a progress bar per block.

    The model keeps its parameters and state_dict keys: pruned weights are exactly zero.

    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> result = oneshot(model, [torch.randn(8, 16) for _ in range(4)], method="wanda", sparsity=0.5)
    >>> round(result.sparsity, 3), [layer.name for layer in result.layers]
    (0.5, ['0.weight', '2.weight'])
    """
    return _oneshot(model, calibration, method=method, sparsity=sparsity, pattern=pattern, group=group, owl=owl,
                    sparsities=sparsities, targets=targets, exclude=exclude, damping=damping,
                    block_size=block_size, refine=refine, dense_targets=dense_targets, offload=offload,
                    progress=progress, stream=None)


def oneshot_streamed(
    model: nn.Module,
    weights: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: Iterable[Any] | None = None,
    **options: Any,
) -> OneshotResult:
    """:func:`oneshot` for a model that need not fit in memory: its blocks are read from the
    safetensors file ``weights`` one at a time, pruned, and written into ``out`` (a safetensors
    file with the same header, so the same keys, dtypes and shapes), then dropped again.

    ``model`` is built with its parameters on the ``meta`` device, under
    :func:`~secateurs.prune.calibration.capture.empty_weights` (its non-persistent buffers,
    such as rotary frequencies, stay real). Peak memory is what lies outside the blocks
    (embeddings, the head) plus one block and one block's calibration activations, whatever the
    depth. The options are :func:`oneshot`'s, except ``group="global"`` (it ranks every weight
    at once). ``out`` appears only once complete. The result equals :func:`oneshot` on the
    model loaded in memory, bit for bit (the same operations in the same order).
    """
    from secateurs.prune.calibration.capture import Streamed

    check(options.get("group", "row") != "global", "group", "global", "row or layer when streaming (global ranks all weights at once)")
    unknown = set(options) - set(inspect.signature(oneshot).parameters)
    check(not unknown, "options", sorted(unknown), "oneshot's keyword arguments")
    chosen = find_targets(model, options.get("targets"), options.get("exclude", ()))
    blocks = find_blocks(model, chosen)
    check(bool(blocks), "model", type(model).__name__, "a model with repeated blocks (a ModuleList of layers) to stream")
    stream = Streamed(model, weights, out, blocks)
    try:
        result = _oneshot(model, calibration, stream=stream, **options)
        stream.finish()
    except BaseException:
        stream.close(discard=True)
        raise
    return result


def _oneshot(
    model: nn.Module, calibration: Iterable[Any] | None = None, *, method: str = "sparsegpt",
    sparsity: float | None = None, pattern: str | tuple[int, int] | None = None, group: str = "row",
    owl: bool | OWL = False, sparsities: Mapping[str, float] | None = None,
    targets: Iterable[str | type[nn.Module]] | None = None, exclude: Iterable[str | type[nn.Module]] = (),
    damping: float = 0.01, block_size: int = 128, refine: int = 0, dense_targets: bool = False,
    offload: torch.device | str | None = None, progress: bool = False, stream: Streamed | None = None,
) -> OneshotResult:
    started = time.perf_counter()
    method = check_choice(method, "method", METHODS)
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None:
            check_fraction(sparsity, "sparsity")
            check(math.isclose(float(sparsity), implied, abs_tol=1e-9), "sparsity", sparsity,
                  f"{implied:g} (set by pattern {nm[0]}:{nm[1]}) or left out")
        target_sparsity = implied
    else:
        check(sparsity is not None, "sparsity", sparsity, "a number in [0, 1), or a pattern such as '2:4'")
        target_sparsity = check_fraction(sparsity, "sparsity")
    group = check_choice(group, "group", GROUPS)
    check(not (group == "global" and method == "sparsegpt"), "group", group,
          "row or layer for sparsegpt (its mask is chosen per block of columns)")
    check(not (group == "global" and nm is not None), "group", group, "row or layer with a pattern")
    owl_config = _owl(owl)
    check(not (owl_config and nm is not None), "owl", owl, "False with a pattern (N:M fixes every layer's sparsity)")
    check(not (owl_config and group == "global"), "owl", owl, "False with group='global'")
    check(sparsities is None or isinstance(sparsities, Mapping), "sparsities", sparsities,
          "a mapping of module name -> sparsity")
    check(not (sparsities and nm is not None), "sparsities", sparsities, "None with a pattern")
    check(isinstance(damping, int | float) and not isinstance(damping, bool) and damping >= 0
          and math.isfinite(damping), "damping", damping, "a number >= 0 (a fraction of mean(diag H))")
    check_int(block_size, "block_size", minimum=1)
    check_int(refine, "refine", minimum=0)
    check(isinstance(dense_targets, bool), "dense_targets", dense_targets, "True or False")
    check(not ((refine or dense_targets) and method != "sparsegpt"), "method", method,
          "sparsegpt with refine or dense_targets (they change its weight update)")
    chosen = find_targets(model, targets, exclude)
    needs_data = method != "magnitude" or bool(owl_config)
    if calibration is None:
        check(not needs_data, "calibration", None,
              f"batches of model inputs: {'owl' if method == 'magnitude' else repr(method)} needs data; only magnitude runs without")
        batches = None
    else:
        batches = make_batches(calibration, offload)

    result = OneshotResult(method, None if nm is None else f"{nm[0]}:{nm[1]}", group)
    with _calibrating(model), bounded_heap():  # freed tensors leave the resident set at once
        per_layer = {t.name: target_sparsity for t in chosen}
        units = None
        if batches is not None and group != "global":
            units = plan_units(model, chosen, batches[0])
        if owl_config:
            assert batches is not None and units is not None
            stats = _dense_stats(model, chosen, batches)
            ratios = [_unit_ratio(u, stats, owl_config.m) for u in units]
            sizes = [sum(t.param.numel() for t in u.targets) for u in units]
            chosen_sparsities = owl_sparsities(ratios, target_sparsity, owl_config.lam, sizes)
            for unit, s in zip(units, chosen_sparsities, strict=True):
                for t in unit.targets:
                    per_layer[t.name] = s
        per_layer.update(_by_hand(chosen, sparsities or {}))
        options = {"pattern": nm, "group": group, "damping": float(damping), "block_size": block_size,
                   "refine": refine}
        if group == "global":
            stats = {} if batches is None or method == "magnitude" else _dense_stats(
                model, chosen, batches, absolute=method == "activation")
            result.layers = _prune_global(chosen, stats, method, target_sparsity)
            result.units = ["model"]
        elif batches is None:
            result.layers = _without_data(model, chosen, method, per_layer, options, stream)
            result.units = ["model"]
        else:
            assert units is not None
            result.units = [u.name for u in units]
            _sequential(model, batches, units, result, method, per_layer, options, offload, progress, stream,
                        dense_targets)
    result.seconds = time.perf_counter() - started
    return result


def _without_data(model: nn.Module, chosen: list[Target], method: str, per_layer: dict[str, float],
                  options: dict[str, Any], stream: Streamed | None) -> list[LayerResult]:
    """Magnitude with no calibration data; a streamed model is read a block at a time."""
    if stream is None:
        return [_prune(t, None, method, per_layer[t.name], "", options) for t in chosen]
    out = []
    holder = {id(m): block for _, _, block in find_blocks(model, chosen) for m in block.modules()}
    for t in chosen:
        block = holder.get(id(t.module))
        if block is not None:
            stream.load(block)
        out.append(_prune(t, None, method, per_layer[t.name], "", options))
        if block is not None:
            stream.unload(block)
    return out


def _owl(owl: bool | OWL) -> OWL | None:
    if isinstance(owl, OWL):
        return owl
    check(isinstance(owl, bool), "owl", owl, "True, False or an OWL(m=..., lam=...)")
    return OWL() if owl else None


def _by_hand(targets: list[Target], sparsities: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in sparsities.items():
        s = check_fraction(value, f"sparsities[{key!r}]")
        found = [t for t in targets if key in (t.name, t.module_name)] or [
            t for t in targets
            if isinstance(key, str) and (fnmatch.fnmatchcase(t.name, key) or fnmatch.fnmatchcase(t.module_name, key))
        ]
        if not found:
            names = ", ".join(t.module_name or t.name for t in targets[:4])
            raise SecateursError(f"sparsities: got {key!r}, which matches no targeted weight; allowed: names such as {names}")
        for t in found:
            out.setdefault(t.name, s)
    return out


@contextmanager
def _calibrating(model: nn.Module):  # type: ignore[no-untyped-def]
    """Evaluation mode and no KV cache while calibrating; both restored afterwards."""
    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    with ExitStack():
        model.eval()
        if use_cache is not None:
            config.use_cache = False  # type: ignore[union-attr]
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(training)
            if use_cache is not None:
                config.use_cache = use_cache  # type: ignore[union-attr]


def _dense_stats(model: nn.Module, targets: list[Target], batches: list[Batch], *, absolute: bool = False) -> dict[str, InputStats]:
    """Per-column input statistics of every target on the dense model, in one pass."""
    from secateurs.inputs import forward, to_device

    recorder = Recorder(targets, hessian=False, absolute=absolute)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with recorder.record():
        for batch in batches:
            recorder.valid = batch.valid
            forward(model, to_device(batch.inputs, device))
    return recorder.stats


def _unit_ratio(unit: Unit, stats: dict[str, InputStats], m: float) -> float:
    found = [scores("wanda", weight_matrix(t.module), stats[t.name]) for t in unit.targets if t.name in stats]
    if not found:
        found = [t.param.detach().abs().float() for t in unit.targets]
    return outlier_ratio(found, m) if found else 0.0


def _relative_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||W X - W' X|| / ||W X||`` from ``H = X^T X``, with no pass over the data."""
    delta = before - after
    num = float((delta @ hessian).mul_(delta).sum())
    den = float((before @ hessian).mul_(before).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _prune(target: Target, stats: InputStats | None, method: str, sparsity: float, unit: str,
           options: dict[str, Any]) -> LayerResult:
    started = time.perf_counter()
    module = target.module
    used, note = method, ""
    if not supports(target):
        used, note = "magnitude", "inputs not observable"
        stats = None
    elif stats is None and method != "magnitude":
        used, note = "magnitude", "no calibration input reached it"
    damping, attempts = None, 0
    if not supports(target):
        weight = target.param.detach().float()
        matrix = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    else:
        matrix = weight_matrix(module)
    run = matrix_run(module) if supports(target) else None
    if used == "sparsegpt":
        assert stats is not None and stats.hessian is not None
        pruned, inverse = sparsegpt(
            matrix, stats.hessian, sparsity=sparsity, pattern=options["pattern"], group=options["group"],
            damping=options["damping"], block_size=options["block_size"], run=run, name=target.name,
            cross=stats.cross if stats.cross is not None and stats.cross_rows == stats.rows else None,
            refine=options["refine"],
        )
        damping, attempts = inverse.damping, inverse.attempts
    else:
        keep = keep_mask(scores(used, matrix, stats), sparsity=sparsity, pattern=options["pattern"],
                         group=options["group"], run=run)
        pruned = torch.where(keep, matrix, torch.zeros((), dtype=matrix.dtype, device=matrix.device))
    error = None
    if stats is not None and stats.hessian is not None:
        error = _relative_error(matrix, pruned, stats.hessian.to(matrix.device))
    if supports(target):
        set_weight_matrix(module, pruned)
    else:
        param = target.param
        param.data.copy_(pruned.reshape(param.shape).to(param.dtype))
    zeros = int((target.param == 0).sum())
    return LayerResult(
        target.name, unit, used, target.shape, target.numel, sparsity, zeros / max(target.numel, 1),
        error, damping, attempts, time.perf_counter() - started, note,
    )


def _prune_global(targets: list[Target], stats: dict[str, InputStats], method: str, sparsity: float) -> list[LayerResult]:
    started = time.perf_counter()
    flats: list[torch.Tensor] = []
    methods: list[str] = []
    for t in targets:
        used = method if (method == "magnitude" or (supports(t) and t.name in stats)) else "magnitude"
        matrix = weight_matrix(t.module) if supports(t) else t.param.detach().float().reshape(t.param.shape[0], -1)
        flats.append(scores(used, matrix, stats.get(t.name)).reshape(-1))
        methods.append(used)
    keeps = [torch.ones_like(f, dtype=torch.bool) for f in flats]
    total = sum(f.numel() for f in flats)
    prune_lowest_(keeps, lambda i, a, b: flats[i][a:b], round(total * sparsity), keep_pruned=False)
    out = []
    for t, keep, used in zip(targets, keeps, methods, strict=True):
        if supports(t):
            matrix = weight_matrix(t.module)
            set_weight_matrix(t.module, torch.where(keep.view(matrix.shape), matrix, torch.zeros(())))
        else:
            p = t.param
            p.data.copy_(torch.where(keep.view(p.shape[0], -1), p.detach().reshape(p.shape[0], -1), 0).reshape(p.shape))
        zeros = int((t.param == 0).sum())
        note = "" if used == method else "inputs not observable"
        out.append(LayerResult(t.name, "model", used, t.shape, t.numel, sparsity, zeros / max(t.numel, 1),
                               seconds=time.perf_counter() - started, note=note))
    return out


def _sequential(model: nn.Module, batches: list[Batch], units: list[Unit], result: OneshotResult, method: str,
                per_layer: dict[str, float], options: dict[str, Any], offload: torch.device | str | None,
                progress: bool, stream: Streamed | None = None, dense_targets: bool = False) -> None:
    def prune_unit(unit: Unit, targets: list[Target], stats: dict[str, InputStats]) -> None:
        for t in targets:
            result.layers.append(_prune(t, stats.get(t.name), method, per_layer[t.name], unit.name, options))

    with ExitStack() as stack:
        on_unit = None
        if progress:
            from rich.progress import Progress

            bar = stack.enter_context(Progress(transient=True))
            task = bar.add_task(f"oneshot {method}", total=len(units))

            def on_unit(unit: Unit) -> None:
                bar.update(task, advance=1, description=f"oneshot {method}: {unit.name}")

        calibrate(model, batches, units, prune_unit, hessian=True, absolute=method == "activation",
                  offload=offload, on_unit=on_unit, dense=dense_targets,
                  load=None if stream is None else stream.load,
                  unload=None if stream is None else stream.unload)
    order = {t: i for i, t in enumerate(n for u in units for n in (x.name for x in u.targets))}
    result.layers.sort(key=lambda layer: order.get(layer.name, len(order)))
