"""Run configuration: one pydantic model, loaded from TOML and ``--set key=value`` overrides.

Every value is validated before any work starts. A bad value, an unknown key, a missing or
malformed file raises :class:`~secateurs.errors.SecateursError` with one line naming the field,
the bad value and what is allowed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secateurs.errors import SecateursError, config_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


DEVICES = "auto, cpu, cuda, cuda:N (N a GPU index from 0), mps"
"""What ``train.device`` allows."""


def check_device_name(value: object) -> str:
    """``value`` if it spells a ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"allowed: {DEVICES}")
    kind, sep, index = value.partition(":")
    if value in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and sep and index.isascii() and index.isdigit()):
        return value
    raise ValueError(f"allowed: {DEVICES}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which data, how it is split and batched."""

    name: str = Field("digits", description="digits | sequence | mnist | fashion-mnist | cifar10 | path to .npz/.safetensors")
    data_dir: str = Field("", description="folder of a torchvision dataset (mnist, fashion-mnist, cifar10)")
    download: bool = Field(False, description="allow torchvision to download the dataset into data_dir")
    batch_size: int = Field(64, ge=1, description="training batch size")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="fraction of the training data held out for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="fraction held out for test when the dataset has no test split")
    split_seed: int = Field(0, ge=0, description="seed of the stratified split (fixed, independent of the run seed)")
    limit: int = Field(0, ge=0, description="use at most this many training examples (0: all)")
    augment: bool = Field(True, description="shift training images by up to one pixel (images only)")


class ModelConfig(_Section):
    """Which network to build."""

    name: str = Field("seed-cnn", description="a zoo model (mlp, seed-cnn, vgg11-bn, vgg16-bn, resnet20, resnet56, mobilenet, lstm, rnn, transformer) or package.module:factory")


class TrainConfig(_Section):
    """The dense training phase and the optimizer used in every phase."""

    epochs: int = Field(20, ge=0, description="dense training epochs")
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop"] = Field("adamw", description="torch.optim optimizer")
    lr: float = Field(3e-3, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum (sgd, rmsprop)")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    nonfinite: Literal["skip", "error", "ignore"] = Field("skip", description="what a step with NaN/Inf gradients does")
    threads: int = Field(1, ge=0, description="torch CPU threads; 1 is fastest for the small built-in models (0: torch's default)")
    device: str = Field("auto", description="where the whole run lives: auto (cuda if there is a GPU, then mps, else cpu), cpu, cuda, cuda:N or mps")

    @field_validator("device", mode="before")
    @classmethod
    def _device_spelling(cls, value: object) -> str:
        """The spelling only; whether the machine has that device is checked when the run starts."""
        return check_device_name(value)


class ClipConfig(_Section):
    """Gradient clipping: ``method`` plus that rule's own keyword arguments (for example ``max_norm``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    method: str = Field("global_norm", description="a clip rule (none, global_norm, autoclip, ...: --help lists every registered one); other keys are the rule's arguments")

    def params(self) -> dict[str, Any]:
        """The rule's keyword arguments: every key but ``method``."""
        return dict(self.model_extra or {})


class PruneConfig(_Section):
    """What is pruned, by which criterion, on which schedule."""

    kind: Literal["unstructured", "structured", "none"] = Field("unstructured", description="masks (unstructured, N:M) or physical removal of channels (structured)")
    criterion: str = Field("magnitude", description="a pruning criterion (magnitude, taylor, ...: --help lists every registered one, for masks and for structured pruning)")
    scope: Literal["global", "layer"] = Field("global", description="rank weights across all layers or within each layer")
    schedule: Literal["oneshot", "iterative", "agp"] = Field("agp", description="oneshot, iterative rounds with fine-tuning, or AGP cubic gradual pruning")
    sparsity: float = Field(0.9, ge=0, lt=1, description="target fraction of prunable weights set to zero (structured: fraction of channels removed)")
    threshold: float | None = Field(None, description="instead of prune.sparsity: prune every weight (structured: channel) whose score is below it, as the seeds' threshold = 0.1 (unset: prune to prune.sparsity; unstructured runs need prune.schedule = 'oneshot')")
    epochs: int = Field(10, ge=1, description="epochs over which the schedule prunes (iterative: rounds x fine-tune epochs)")
    rounds: int = Field(3, ge=1, description="pruning rounds (iterative, structured)")
    finetune_epochs: int = Field(10, ge=0, description="fine-tuning epochs after the last pruning step")
    per_layer: dict[str, float] = Field(default_factory=dict, description="module name -> its own sparsity")
    pattern: str = Field("", description="N:M pattern such as 2:4: at most N of every M weights along a layer's input dimension are kept, then prune.sparsity applies on top (the pattern alone is 1 - N/M: set prune.sparsity to it for pure N:M; a layer whose input dimension is not a multiple of M cannot follow it, and the report names it); empty: none")
    exclude: list[str] = Field(default_factory=list, description="module names never pruned")
    score_batches: int = Field(8, ge=1, description="batches used by data-dependent criteria")
    lr: float = Field(0.0, ge=0, description="learning rate while pruning and fine-tuning (0: train.lr / 3)")

    @field_validator("per_layer")
    @classmethod
    def _per_layer_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, s in value.items():
            if not 0 <= s < 1:
                raise ValueError(f"prune.per_layer.{name} must be in [0, 1), got {s!r}")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_is_n_m(cls, value: str) -> str:
        if not value:
            return value
        n, sep, m = value.partition(":")
        if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"prune.pattern must be 'N:M' with 0 < N < M, got {value!r}")
        return value


class SweepConfig(_Section):
    """The grid of ``secateurs sweep``: every criterion x sparsity x seed (x clipping rule) is a run."""

    criteria: list[str] = Field(default_factory=lambda: ["magnitude", "gradient", "activation", "taylor", "random"], description="criteria to compare (each must suit prune.kind)")
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.98], description="target sparsities")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="run seeds")
    clip_methods: list[str | dict[str, Any]] = Field(default_factory=list, description="clipping rules to cross with the grid: names, or inline tables such as {method = 'norm', max_norm = 1.0} (empty: the base config's)")

    @field_validator("criteria", "sparsities", "seeds")
    @classmethod
    def _axis_is_a_distinct_non_empty_list(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("allowed: a non-empty list (every axis of the grid needs at least one value)")
        if len(set(value)) != len(value):
            raise ValueError("allowed: distinct values")
        return value

    @field_validator("sparsities")
    @classmethod
    def _sparsities_in_range(cls, value: list[float]) -> list[float]:
        bad = [s for s in value if not 0 <= s < 1]
        if bad:
            raise ValueError(f"sparsity {bad[0]!r} is out of range; allowed: numbers in [0, 1)")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_non_negative(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value):
            raise ValueError("allowed: integers >= 0")
        return value

    @field_validator("clip_methods")
    @classmethod
    def _clip_methods_build(cls, value: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        from secateurs import clip

        for item in value:
            if isinstance(item, str):
                continue  # checked against the base config's rule by the sweep (it may borrow its arguments)
            params = dict(item)
            method = params.pop("method", None)
            if not isinstance(method, str):
                raise ValueError(f"{item!r} names no method; allowed: a rule name or a table with 'method'")
            try:
                with config_keys("clip."):
                    clip.build(method, **params)
            except SecateursError as exc:
                raise ValueError(str(exc)) from None
        return value


class SensitivityConfig(_Section):
    """Per-layer sensitivity analysis and the search for per-layer sparsities."""

    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98], description="sparsities at which each layer is probed")
    goal: Literal["target", "highest"] = Field("target", description="reach sensitivity.target with the least validation loss, or the highest sparsity within the budget")
    target: float = Field(0.9, gt=0, lt=1, description="overall sparsity the search must reach (goal = 'target')")
    budget: float = Field(0.01, ge=0, lt=1, description="validation accuracy the pruned model may lose before fine-tuning (fraction)")

    @field_validator("sparsities")
    @classmethod
    def _probe_sparsities(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("allowed: a non-empty list of numbers in (0, 1)")
        bad = [s for s in value if not 0 < s < 1]
        if bad:
            raise ValueError(f"sparsity {bad[0]!r} is out of range; allowed: numbers in (0, 1)")
        return sorted(set(value))


class RunConfig(_Section):
    """Everything ``secateurs run`` needs. ``secateurs run --help`` lists every key."""

    seed: int = Field(0, ge=0, description="seed of model initialisation, data order and random criteria")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    clip: ClipConfig = Field(default_factory=lambda: ClipConfig(method="global_norm", max_norm=1.0))
    prune: PruneConfig = Field(default_factory=PruneConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)

    @model_validator(mode="after")
    def _schedule_reaches_the_target(self) -> RunConfig:
        """Rounds one epoch apart at the least: more rounds than prune epochs never end."""
        p = self.prune
        rounds_apply = p.kind == "structured" or (p.kind == "unstructured" and p.schedule == "iterative")
        if p.threshold is None and rounds_apply and p.rounds > p.epochs:
            raise SecateursError(
                f"prune.rounds: got {p.rounds} with prune.epochs = {p.epochs}; the schedule prunes at most once "
                f"an epoch, so the last {p.rounds - p.epochs} rounds would never run and the target "
                f"{p.sparsity} would not be reached; allowed: prune.rounds <= prune.epochs "
                f"(--set prune.rounds={p.epochs}, or --set prune.epochs={p.rounds})",
                field="prune.rounds",
            )
        return self

    @model_validator(mode="after")
    def _names_are_known(self) -> RunConfig:
        from secateurs import clip, prune
        from secateurs.experiment.models import MODELS

        with config_keys("clip."):
            clip.build(self.clip.method, **self.clip.params())
        criteria = prune.GROUP_CRITERIA if self.prune.kind == "structured" else prune.CRITERIA
        if self.prune.kind != "none" and self.prune.criterion not in criteria:
            raise SecateursError(f"prune.criterion: got {self.prune.criterion!r}; allowed: {', '.join(criteria)}")
        if self.prune.threshold is not None:
            with config_keys("prune."):
                prune.pruner.check_threshold(self.prune.threshold)
            if self.prune.kind == "unstructured" and self.prune.schedule != "oneshot":
                raise SecateursError(
                    f"prune.threshold: got {self.prune.threshold!r} with prune.schedule = {self.prune.schedule!r}; "
                    "allowed: prune.schedule = 'oneshot' (a threshold prunes once), or unset prune.threshold"
                )
        if ":" not in self.model.name and self.model.name not in MODELS:
            raise SecateursError(f"model.name: got {self.model.name!r}; allowed: {', '.join(MODELS)} or 'package.module:factory'")
        data_names = ("digits", "sequence", "mnist", "fashion-mnist", "cifar10")
        if self.data.name not in data_names and Path(self.data.name).suffix not in (".npz", ".safetensors"):
            raise SecateursError(f"data.name: got {self.data.name!r}; allowed: {', '.join(data_names)} or a .npz/.safetensors file")
        return self


def _format_error(exc: ValidationError, data: Mapping[str, Any]) -> str:
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a model validator: its message already names the field
        return msg
    loc = ".".join(str(p) if str(p).isprintable() and str(p) else repr(p) for p in err["loc"])
    value: Any = data
    for part in err["loc"]:
        value = value.get(part, None) if isinstance(value, Mapping) else None
    if err["type"] == "extra_forbidden":
        section: Any = RunConfig
        for part in err["loc"][:-1]:
            section = section.model_fields[str(part)].annotation
        allowed = ", ".join(section.model_fields)
        return f"{loc}: unknown key; allowed keys here: {allowed}"
    return f"{loc}: got {value!r}; {msg}"


def validate(data: Mapping[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, or raise one-line SecateursError."""
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SecateursError(_format_error(exc, data)) from None


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (numbers, booleans, lists, inline tables), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` to a nested dict in place."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SecateursError(f"--set: got {assignment!r}; allowed: KEY=VALUE such as prune.sparsity=0.8")
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SecateursError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = parse_value(raw.strip())


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning a missing or malformed file into a one-line SecateursError."""
    p = Path(path)
    if not p.is_file():
        raise SecateursError(f"config: {str(p)!r} does not exist or is not a file; allowed: a TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SecateursError(f"config: {str(p)!r} is not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SecateursError(f"config: {str(p)!r} is not UTF-8 text; allowed: a TOML file") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Resolve a config: defaults, then the TOML file (if any), then each ``--set`` in order."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data)


def to_toml(config: RunConfig) -> str:
    """The fully resolved config as TOML; ``secateurs run`` reads it back to repeat a run."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def _live_descriptions() -> dict[str, str]:
    """Descriptions listing what is registered now (a user's own rules and criteria included)."""
    from secateurs import clip, prune

    return {
        "clip.method": f"{' | '.join(clip.METHODS)}; other keys are the rule's arguments",
        "prune.criterion": f"{' | '.join(prune.CRITERIA)} (structured: {' | '.join(prune.GROUP_CRITERIA)})",
    }


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, description) for every config key, for ``--help``; the lists of clip rules
    and criteria are read from their registries when called."""
    rows: list[tuple[str, str, str]] = []
    live = _live_descriptions()

    def walk(model: type[BaseModel], prefix: str) -> None:
        defaults = model()
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            key = f"{prefix}{name}"
            rows.append((key, repr(getattr(defaults, name)), live.get(key, field.description or "")))

    walk(RunConfig, "")
    return rows
