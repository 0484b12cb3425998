"""The ``secateurs`` command line: run, sweep, sensitivity, inspect, prune.

A user error (bad config value, unknown key, missing file, a file that is not a checkpoint) is
printed as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar


def _exit_interrupted(signum: int, frame: object) -> None:
    """Ctrl-C outside a training loop (start-up, imports, loading, writing the report): one line
    and exit code 130 at once. Every file is written atomically, so nothing is left half done;
    the training loops install their own handler, which stops after a whole step."""
    os.write(2, b"secateurs: interrupted\n")
    os._exit(130)


# The console script imports this module before it calls main(): a Ctrl-C during the imports
# below is already one line there (``python -m secateurs`` installs it in __main__).
if Path(sys.argv[0]).name in ("secateurs", "secateurs.exe"):
    signal.signal(signal.SIGINT, _exit_interrupted)

import typer  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

from secateurs.errors import SecateursError  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])


def _process_start() -> float:
    """When this process started, on the ``time.perf_counter()`` clock (Linux: from /proc;
    elsewhere: now, when the CLI is imported), so a run's wall time includes its start-up."""
    now = time.perf_counter()
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - age if 0 <= age < 60 else now


_STARTED = _process_start()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Gradient clipping and neural-network pruning for PyTorch.",
)


def _keys_epilog() -> str:
    from secateurs.experiment.config import describe_keys

    rows = [f"{key} (default {default}): {desc}" for key, default, desc in describe_keys()]
    return "Config keys (TOML tables, or --set key=value):\n\n" + "\n\n".join(rows)


class _WithConfigKeys(TyperCommand):
    """A command whose ``--help`` ends with every config key, built when the help is shown: the
    lists of clip rules and criteria are then read from their registries, and no other command
    (nor ``secateurs --help``) pays for importing them."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.epilog = _keys_epilog()
        super().format_help(ctx, formatter)


def user_errors(fn: F) -> F:
    """Turn SecateursError (and a clean Ctrl-C) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SecateursError as exc:
            typer.echo(f"secateurs: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # an output folder that cannot be written, a full disk
            name = f" {exc.filename!r}" if exc.filename else ""
            typer.echo(f"secateurs: error: cannot write{name}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


ConfigArg = Annotated[str | None, typer.Argument(help="TOML config file (defaults apply to every key it leaves out)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override one key: --set prune.sparsity=0.8 (repeatable)")]


def _default_out(prefix: str = "") -> Path:
    return Path("runs") / time.strftime(f"{prefix}%Y%m%d-%H%M%S")


@app.command(cls=_WithConfigKeys)
@user_errors
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/<timestamp>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this folder from its last epoch")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Train dense with clipping, prune, fine-tune, evaluate, and write a report.

    A model of your own: model.name = "module:factory" (module.py in the current folder, or any
    importable package.module). The factory is a class or a function; it is called as
    factory(input_shape=(C, H, W) for images or (T, F) for sequences, without the batch
    dimension, num_classes=int) and must return an nn.Module.

    prune.pattern = "N:M" keeps at most N of every M weights along a layer's input dimension;
    prune.sparsity still applies on top (the pattern alone is a sparsity of 1 - N/M: set
    prune.sparsity to it for pure N:M). Layers whose input dimension is not a multiple of M
    cannot follow the pattern; the report names them.
    """
    from secateurs.experiment.config import load_config

    if resume is not None:
        if config is not None or set_:
            raise SecateursError("--resume: takes no CONFIG or --set; the run's own config.toml is used")
        from secateurs.experiment import run as runner  # torch: only once the arguments are checked

        was_finished = runner.finished(resume) is not None
        try:
            report = runner.resume(resume, progress=not quiet, started=_STARTED)
        except runner.Interrupted:
            typer.echo(f"secateurs: interrupted; resume with: {runner.resume_command(resume)}", err=True)
            raise typer.Exit(130) from None
        out = resume
        if was_finished and os.environ.get("RANK", "0") == "0":
            typer.echo(f"secateurs: {resume} holds a finished run (report.json); nothing was run again", err=True)
    else:
        cfg = load_config(config, set_ or ())  # a bad key is reported before torch is imported
        from secateurs.experiment import run as runner

        out = out or _default_out()
        try:
            report = runner.start(cfg, out, progress=not quiet, started=_STARTED)
        except runner.Interrupted:
            typer.echo(f"secateurs: interrupted; resume with: {runner.resume_command(out)}", err=True)
            raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks
        return
    d, f = report["dense"], report["final"]
    shrink = f"params {d['params']:,} -> {f['params']:,}" if f["params"] < d["params"] else f"sparsity {f['sparsity']:.3f}"
    typer.echo(
        f"dense accuracy {d['accuracy']:.4f} -> final {f['accuracy']:.4f} at {shrink}; "
        f"checkpoint {d['checkpoint_bytes']:,} -> {f['checkpoint_bytes']:,} bytes; "
        f"{report['wall_seconds']:.1f} s; wrote {out}/"
    )


@app.command()
@user_errors
def inspect(
    file: Annotated[str, typer.Argument(help="a secateurs sparse checkpoint, a run's checkpoint.safetensors or any safetensors file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON (for scripts) instead of a table")] = False,
) -> None:
    """Per-tensor table of a checkpoint: shape, params, zeros, sparsity, bytes, dtype, non-finite.

    Checks the file as it reads it: a bitmask that does not match its values, or NaN/Inf in
    the model's weights, is one line on stderr and exit code 2 (after the table, for NaN/Inf).
    """
    import json

    from secateurs import prune

    rows = prune.inspect_checkpoint(file)
    params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    if as_json:
        total = {"params": params, "zeros": zeros, "sparsity": zeros / max(params, 1), "bytes": sum(r["bytes"] for r in rows)}
        typer.echo(json.dumps({"file": file, "tensors": rows, "total": total}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=file)
        for column in ("tensor", "shape", "params", "zeros", "sparsity", "bytes", "dtype", "non-finite"):
            table.add_column(column, justify="left" if column in ("tensor", "shape", "dtype") else "right", no_wrap=True)
        for row in rows:
            table.add_row(
                row["name"], "x".join(map(str, row["shape"])) or "scalar", f"{row['params']:,}", f"{row['zeros']:,}",
                f"{100 * row['sparsity']:.2f}%", f"{row['bytes']:,}", row["dtype"], f"{row['nonfinite']:,}" if row["nonfinite"] else "",
            )
        table.add_row("total", "", f"{params:,}", f"{zeros:,}", f"{100 * zeros / max(params, 1):.2f}%", f"{sum(r['bytes'] for r in rows):,}", "", "")
        needed = Console(width=1 << 16).measure(table).maximum
        console = Console()
        Console(width=max(console.width, needed)).print(table)  # whole names, never cut
    broken = [r for r in rows if r["nonfinite"] and r["in_model"]]
    if broken:
        named = ", ".join(f"{r['name']} ({r['nonfinite']:,})" for r in broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise SecateursError(f"checkpoint: got {file!r} with NaN or infinite weights in {len(broken)} tensors: {named}")


@app.command(cls=_WithConfigKeys)
@user_errors
def sweep(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/sweep-<timestamp>); the same folder again resumes")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    jobs: Annotated[int, typer.Option("--jobs", help="runs at once, each in its own process (give each train.threads=1 on a small machine)")] = 1,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="also log every run to OUT/tensorboard (needs the tensorboard package)")] = False,
) -> None:
    """Run the grid sweep.criteria x sweep.sparsities x sweep.seeds (x sweep.clip_methods).

    Writes sweep.csv (one row per run), sweep.md (mean +- std per criterion and sparsity, dense
    baseline) and tradeoff.png (accuracy vs compression). Run the same command again to resume:
    finished runs are kept.
    """
    from secateurs.experiment.config import load_config

    cfg = load_config(config, set_ or ())  # a bad key is reported before torch is imported
    from secateurs.experiment import run as runner
    from secateurs.experiment import sweep as sweeper

    out = out or _default_out("sweep-")
    on_cell = None
    if tensorboard:
        from secateurs.experiment import tensorboard as tb

        tb.require()

        def on_cell(cell: Any, report: dict[str, Any], folder: Path) -> None:
            hparams = {"criterion": cell.criterion, "sparsity": cell.sparsity, "seed": cell.seed, "clip": cell.clip or cell.config.clip.method}
            tb.write_run(out / "tensorboard" / cell.name, report, hparams=hparams)

    started = time.perf_counter()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the worker pool stops on KeyboardInterrupt
    try:
        rows = sweeper.sweep(cfg, out, progress=not quiet, jobs=jobs, on_cell=on_cell)
    except (runner.Interrupted, KeyboardInterrupt):
        typer.echo(f"secateurs: interrupted; resume with: secateurs sweep {out}/sweep.toml --out {out}", err=True)
        raise typer.Exit(130) from None
    dense = sweeper.summarise(rows)["dense"]
    baseline = ", ".join(f"{100 * s.mean:.2f}%" for s in dense.values())
    typer.echo(f"{len(rows)} runs (dense accuracy {baseline}); {time.perf_counter() - started:.0f} s; wrote {out}/sweep.md, sweep.csv, tradeoff.png")


@app.command(cls=_WithConfigKeys)
@user_errors
def sensitivity(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/sensitivity-<timestamp>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Per-layer sensitivity curves and a search for per-layer sparsities.

    Trains the dense model, prunes each layer alone at sensitivity.sparsities (sensitivity.png),
    then searches per-layer sparsities reaching sensitivity.target (or, with
    sensitivity.goal=highest, the highest sparsity within sensitivity.budget) on the validation
    split. Writes per_layer.toml, a run config that `secateurs run` takes as it is.
    """
    from secateurs.experiment.config import load_config

    cfg = load_config(config, set_ or ())  # a bad key is reported before torch is imported
    from secateurs.experiment import run as runner
    from secateurs.experiment import sensitivity as analysis

    out = out or _default_out("sensitivity-")
    try:
        result = analysis.analyse(cfg, out, progress=not quiet)
    except runner.Interrupted:
        typer.echo(f"secateurs: interrupted; resume with: secateurs sensitivity {out}/config.toml --out {out}", err=True)
        raise typer.Exit(130) from None
    d, found, uni, glo = result["dense"], result["search"], result["uniform"], result["global"]
    typer.echo(
        f"per-layer sparsities reach {100 * found['sparsity']:.1f}% overall; validation accuracy right after pruning: "
        f"searched {100 * found['val_accuracy']:.1f}%, uniform layer-wise {100 * uni['val_accuracy']:.1f}%, "
        f"global {100 * glo['val_accuracy']:.1f}% (dense {100 * d['val_accuracy']:.1f}%)"
    )
    if not result["within_budget"]:
        typer.echo(
            f"note: {100 * (d['val_accuracy'] - found['val_accuracy']):.1f} points below dense before fine-tuning, "
            f"beyond sensitivity.budget={result['budget']}; fine-tuning in `secateurs run` recovers part of it"
        )
    typer.echo(f"wrote {out}/sensitivity.md, sensitivity.png, per_layer.toml; train with: secateurs run {out}/per_layer.toml")


def _import_path_like_python_m() -> None:
    """Put the current folder first on the import path, as ``python -m secateurs`` does, so a
    ``model.name = "mymodel:Net"`` next to the user is found by the ``secateurs`` script too."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


@app.command("prune")
@user_errors
def prune_command(
    model: Annotated[str, typer.Argument(help="a Hugging Face folder (config.json + weights) or a .safetensors state dict (with --factory)")],
    calibration: Annotated[Path | None, typer.Option("--calibration", help="text / JSONL file (tokenised with the model's tokenizer), .npz / .safetensors input tensors, or an image folder")] = None,
    evaluation: Annotated[Path | None, typer.Option("--eval", help="data to compare the pruned model with the dense one (same forms as --calibration)")] = None,
    method: Annotated[str, typer.Option("--method", help="sparsegpt, wanda, magnitude or activation")] = "sparsegpt",
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="fraction of every targeted weight pruned, in [0, 1)")] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="N:M, e.g. 2:4 (keep N of every M input weights)")] = None,
    group: Annotated[str, typer.Option("--group", help="compare weights per row, per layer or globally")] = "row",
    owl: Annotated[bool, typer.Option("--owl", help="outlier-weighted per-layer sparsities (OWL)")] = False,
    damping: Annotated[float, typer.Option("--damping", help="SparseGPT dampening, a fraction of mean(diag H)")] = 0.01,
    refine: Annotated[int, typer.Option("--refine", help="SparseGPT: re-solve each layer's kept weights for its mask, up to N conjugate-gradient iterations (0: published SparseGPT; on MiniLM at 2:4, 3 gave 0.898 and 20 gave 0.905 against 0.879, 3 adding about a quarter to the time)")] = 0,
    factory: Annotated[str | None, typer.Option("--factory", help="package.module:function building the model of a .safetensors MODEL")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="module or parameter names (fnmatch) left dense; repeatable")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per text (window length for causal LMs)")] = 128,
    samples: Annotated[int, typer.Option("--samples", help="calibration examples (texts, windows, images) used")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="examples per forward")] = 8,
    out: Annotated[Path | None, typer.Option("--out", help="output folder, written all at once (default runs/prune-<timestamp>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    kind: Annotated[str, typer.Option("--kind", help="oneshot (weights masked) or structured (whole heads and MLP neurons removed)")] = "oneshot",
    criterion: Annotated[str, typer.Option("--criterion", help="structured: magnitude, taylor, activation or fluctuation")] = "fluctuation",
    reconstruct: Annotated[str | None, typer.Option("--reconstruct", help="structured: bias (FLAP) or lstsq, the next layer absorbs what was removed")] = None,
    heads: Annotated[float | None, typer.Option("--heads", help="structured: fraction of heads removed (overrides --sparsity; 0 keeps them)")] = None,
    neurons: Annotated[float | None, typer.Option("--neurons", help="structured: fraction of MLP neurons removed (overrides --sparsity)")] = None,
    hidden: Annotated[float | None, typer.Option("--hidden", help="structured: fraction of the hidden size (residual width) removed; default none")] = None,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="structured: distillation steps from the dense model on the calibration data")] = 0,
    recover_lr: Annotated[float, typer.Option("--recover-lr", help="structured: AdamW learning rate of the recovery step")] = 1e-4,
    clip_rule: Annotated[str, typer.Option("--clip", help="structured: clipping rule of the recovery step (a secateurs.clip name, or none)")] = "global_norm",
    max_norm: Annotated[float, typer.Option("--max-norm", help="structured: max_norm of the --clip rule, where it takes one")] = 1.0,
    target: Annotated[list[str] | None, typer.Option("--target", help="module or parameter names (fnmatch) to prune, default every Linear/Conv weight; a pattern reaches only prunable layers' weights; repeatable")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the weights that would be pruned (after --target and --exclude) and stop; writes nothing")] = False,
) -> None:
    """Prune a model you already have, once, from calibration data (Wanda, SparseGPT, OWL), or
    structurally (--kind structured: whole heads / KV groups and MLP neurons of a Hugging Face
    Transformer, config rewritten so stock from_pretrained loads it; optional recovery step).

    Writes OUT/ with the pruned model in the format it came in, report.json / report.md
    (per-layer sparsity, reconstruction error and dampening; quality before and after on
    --eval), timings.json and layers.png.
    """
    if dry_run:
        if kind != "oneshot":
            raise SecateursError(f"--dry-run: got it with --kind {kind}; allowed: --kind oneshot", field="--dry-run")
        from secateurs.pretrained.command import list_targets

        rows = list_targets(model, factory=factory, targets=target, exclude=exclude or [])
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            typer.echo(f"{r['name']:<{width}}  {r['layer']:<10}  {'x'.join(map(str, r['shape'])):>12}  {r['params']:>12,}")
        typer.echo(f"{len(rows)} weights, {sum(r['params'] for r in rows):,} parameters would be pruned")
        return
    out = out or _default_out("prune-")
    if kind == "structured":
        from secateurs.pretrained.structured import prune_structured_pretrained

        done = prune_structured_pretrained(
            model, calibration=calibration, evaluation=evaluation, sparsity=sparsity, heads=heads, neurons=neurons,
            criterion=criterion, reconstruct=reconstruct, recover_steps=recover_steps, recover_lr=recover_lr,
            clip_rule=clip_rule, max_norm=max_norm, seq_len=seq_len, samples=samples, batch_size=batch_size, out=out,
            hidden=hidden,
        )
        agree = "".join(f", {k} {v:.4f}" for k, v in done["quality"].get("agreement", {}).items())
        typer.echo(f"structured: {done['record']['sparsity']:.4f} of the heads and neurons removed{agree}; wrote {out}/")
        return
    if kind != "oneshot":
        raise SecateursError(f"--kind: got {kind!r}; allowed: oneshot, structured", field="--kind")
    from secateurs.pretrained.command import prune_pretrained

    done = prune_pretrained(
        model, calibration=calibration, evaluation=evaluation, method=method, sparsity=sparsity, pattern=pattern,
        group=group, owl=owl, damping=damping, factory=factory, exclude=exclude or [], seq_len=seq_len,
        samples=samples, batch_size=batch_size, out=out, progress=not quiet, targets=target, refine=refine,
    )
    result, quality = done["result"], done["quality"]
    agree = quality.get("agreement", {})
    measured = "".join(f", {k} {v:.4f}" for k, v in agree.items())
    ppl = quality.get("pruned", {}).get("perplexity")
    if ppl is not None:
        measured += f", perplexity {quality['dense']['perplexity']:.2f} -> {ppl:.2f}"
    typer.echo(f"{result.method}: sparsity {result.sparsity:.4f} over {len(result.layers)} weights{measured}; {result.seconds:.1f} s; wrote {out}/")


def main() -> None:
    """Console entry point (also ``python -m secateurs``)."""
    signal.signal(signal.SIGINT, _exit_interrupted)
    _import_path_like_python_m()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("secateurs: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
