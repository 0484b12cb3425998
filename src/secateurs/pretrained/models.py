"""Loading the model to prune, and saving it back in the same format."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from secateurs.errors import SecateursError

__all__ = ["FACTORY_FORMS", "LoadedModel", "build_from_factory", "load_model", "quiet_transformers"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers: the CLI speaks for itself, and an error
    stays one line."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """The model, where it came from, and what comes with it."""

    model: nn.Module
    kind: str
    """``"hf"`` (a Hugging Face folder) or ``"safetensors"`` (a state dict and its factory)."""
    source: Path
    tokenizer: Any = None
    causal_lm: bool = False

    def save(self, folder: Path) -> list[str]:
        """Write the (pruned) model into ``folder`` in its own format; the names written."""
        if self.kind == "hf":
            self.model.save_pretrained(folder, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
            return sorted(p.name for p in folder.iterdir())
        from safetensors.torch import save

        from secateurs.serialization import atomic_write_bytes

        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(folder / self.source.name, save(state, metadata={"format": "pt"}))
        return [self.source.name]


def load_model(spec: str, factory: str | None = None) -> LoadedModel:
    """``spec``: a Hugging Face folder (``config.json`` + weights, read with
    ``local_files_only``) or a ``.safetensors`` state dict built by ``factory``
    (``package.module:function`` returning the ``nn.Module``)."""
    path = Path(spec)
    if path.is_dir():
        if factory is not None:
            raise SecateursError(f"--factory: got {factory!r} with a folder; allowed: only with a .safetensors MODEL")
        return _load_hf(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SecateursError(f"MODEL: got {spec!r}; allowed: a Hugging Face folder or a .safetensors file (with --factory)")
        if factory is None:
            raise SecateursError(
                f"--factory: got None for {spec!r}; allowed: the model the state dict belongs to: {FACTORY_FORMS}"
            )
        return _load_state_dict(path, factory)
    raise SecateursError(f"MODEL: got {spec!r}, which does not exist; allowed: a Hugging Face folder or a .safetensors file")


def _load_hf(folder: Path) -> LoadedModel:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SecateursError(f"MODEL: got {str(folder)!r} without config.json; allowed: a Hugging Face model folder")
    if not any((folder / name).is_file() for name in _WEIGHTS) and not any(folder.glob("*.safetensors")):
        raise SecateursError(
            f"MODEL: got {str(folder)!r} with config.json but no weights; allowed: a folder with model.safetensors "
            "(or pytorch_model.bin)"
        )
    try:
        import transformers
    except ImportError:
        raise SecateursError("MODEL: a Hugging Face folder needs transformers; allowed: pip install 'secateurs[hf]'") from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecateursError(f"MODEL: got {str(config_file)!r}, which is not JSON ({exc})") from None
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SecateursError(f"MODEL: got {str(folder)!r}, which transformers cannot load ({type(exc).__name__}: {exc})") from None
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    causal = bool(architectures) and architectures[0].endswith("ForCausalLM")
    return LoadedModel(model.eval(), "hf", folder, tokenizer, causal)


FACTORY_FORMS = (
    "package.module:function; a zoo name with its input shape and classes, NAME:CxHxW:CLASSES "
    "(e.g. resnet20:3x32x32:10; the names secateurs run trains); or torchvision.NAME[:CLASSES] "
    "(e.g. torchvision.resnet18:1000, built with weights=None)"
)
"""What ``--factory`` accepts."""


def build_from_factory(factory: str) -> nn.Module:
    """The model ``factory`` names (:data:`FACTORY_FORMS`), with its initial weights.

    >>> build_from_factory("mlp:1x8x8:10").net[1].in_features
    64
    """
    if factory.startswith("torchvision."):
        return _torchvision(factory)
    from secateurs.experiment.models import MODELS, build_model

    name, _, rest = factory.partition(":")
    if name in MODELS:
        shape, sep, classes = rest.partition(":")
        try:
            input_shape = tuple(int(d) for d in shape.split("x"))
            num_classes = int(classes)
        except ValueError:
            input_shape, num_classes = (), 0
        if not sep or not input_shape or min(input_shape) < 1 or num_classes < 1:
            raise SecateursError(
                f"--factory: got {factory!r}; allowed: {name}:CxHxW:CLASSES, the input shape (without the batch) "
                f"and the classes it was trained with, e.g. {name}:3x32x32:10"
            )
        return build_model(name, input_shape=input_shape, num_classes=num_classes)
    module_name, sep, fn_name = factory.partition(":")
    if not sep or not module_name or not fn_name:
        raise SecateursError(f"--factory: got {factory!r}; allowed: {FACTORY_FORMS}; zoo names: {', '.join(MODELS)}")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise SecateursError(f"--factory: got {factory!r}, which cannot be imported ({exc}); allowed: {FACTORY_FORMS}") from None
    return fn()


def _torchvision(factory: str) -> nn.Module:
    name, _, classes = factory.removeprefix("torchvision.").partition(":")
    try:
        from torchvision import models
    except ImportError:
        raise SecateursError(f"--factory: got {factory!r}, which needs torchvision; allowed: pip install torchvision") from None
    names = models.list_models(module=models)
    if name not in names:
        raise SecateursError(f"--factory: got {factory!r}; allowed: torchvision.NAME with NAME one of {', '.join(names[:8])}, ...")
    kwargs: dict[str, Any] = {"weights": None}
    if classes:
        if not classes.isdigit() or int(classes) < 1:
            raise SecateursError(f"--factory: got {factory!r}; allowed: torchvision.{name}:CLASSES with CLASSES a positive integer")
        kwargs["num_classes"] = int(classes)
    return models.get_model(name, **kwargs)


def _load_state_dict(path: Path, factory: str) -> LoadedModel:
    model = build_from_factory(factory)
    if not isinstance(model, nn.Module):
        raise SecateursError(f"--factory: got {factory!r}, which returned a {type(model).__name__}; allowed: a function returning an nn.Module")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(path.read_bytes())
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise SecateursError(f"MODEL: got {str(path)!r}, which does not fit {factory} ({type(exc).__name__}: {exc})") from None
    if missing or unexpected:
        raise SecateursError(
            f"MODEL: got {str(path)!r}, whose keys do not match {factory} (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return LoadedModel(model.eval(), "safetensors", path)
