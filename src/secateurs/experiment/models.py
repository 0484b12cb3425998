"""The model zoo: small, CPU-friendly networks that every pruning path is tested on.

Every factory takes ``input_shape`` (without the batch dimension: ``(C, H, W)`` for images,
``(T, F)`` for sequences) and ``num_classes``. Sequence models read an image as a sequence of its
rows, so every model runs on every dataset.

A user's own model (``model.name = "package.module:factory"``) follows :data:`FACTORY_CONTRACT`:
the factory is a class or a function, called with those two keyword arguments, returning an
``nn.Module``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from secateurs.errors import SecateursError

ModelFactory = Callable[..., nn.Module]

FACTORY_CONTRACT = (
    "a class or function called as factory(input_shape=(C, H, W) or (T, F), num_classes=int) "
    "that returns an nn.Module"
)
"""What ``model.name = "package.module:factory"`` must name (README, ``secateurs run --help``)."""


def _as_sequence_shape(input_shape: Sequence[int]) -> tuple[int, int]:
    """(T, F) seen by a sequence model: an image (C, H, W) is H steps of C*W features."""
    if len(input_shape) == 2:
        return int(input_shape[0]), int(input_shape[1])
    if len(input_shape) == 3:
        c, h, w = input_shape
        return int(h), int(c * w)
    raise SecateursError(f"model.input_shape: got {tuple(input_shape)!r}; allowed: (T, F) or (C, H, W)")


def _to_sequence(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W)
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
    return x


class MLP(nn.Module):
    """LeNet-300-100 shaped multilayer perceptron (Han et al. 2015)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (300, 100)):
        super().__init__()
        width = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SeedCNN(nn.Module):
    """The seed article's CIFAR-10 CNN: conv32-pool-conv64-pool-conv64-fc64-fc10.

    On 32x32 inputs it is exactly the seed's Keras model (3x3 'valid' convolutions). Inputs
    smaller than 16 pixels (the 8x8 digits) use 'same' padding so that two poolings still fit.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        pad = 1 if min(h, w) < 16 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=pad), nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm. Poolings that would shrink the map below 1x1 are skipped."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: str = "vgg11", width: float = 1.0):
        super().__init__()
        c, h, _ = input_shape
        layers: list[nn.Module] = []
        size = h
        for v in _VGG_CFG[depth]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, int(v * width))
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-20/32/56 for CIFAR (He et al. 2016): three stages of 16/32/64 channels."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20):
        super().__init__()
        if (depth - 2) % 6:
            raise SecateursError(f"model.depth: got {depth!r}; allowed: 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNet(nn.Module):
    """A small MobileNetV2-style network: inverted residuals with depthwise convolutions."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 16):
        super().__init__()
        c, h, _ = input_shape
        stride0 = 1 if h < 16 else 2
        w = width
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, stride0, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(w, w, 1, 1),
            InvertedResidual(w, 2 * w, 2, 4),
            InvertedResidual(2 * w, 2 * w, 1, 4),
            InvertedResidual(2 * w, 4 * w, 2, 4),
            InvertedResidual(4 * w, 4 * w, 1, 4),
        )
        self.head = nn.Sequential(nn.Conv2d(4 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


class RNNClassifier(nn.Module):
    """LSTM (or plain tanh RNN) over a sequence; classifies from the last hidden state."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 64, cell: str = "lstm", layers: int = 1):
        super().__init__()
        _, features = _as_sequence_shape(input_shape)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn_cls(features, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(_to_sequence(x))
        return self.fc(out[:, -1])


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block built from nn.MultiheadAttention and a Linear FFN."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TransformerClassifier(nn.Module):
    """A small Transformer encoder over the rows of an image (or a sequence), mean-pooled."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 64, heads: int = 4, ffn: int = 128, depth: int = 2):
        super().__init__()
        steps, features = _as_sequence_shape(input_shape)
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(1, steps, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(_to_sequence(x)) + self.pos
        x = self.norm(self.blocks(x))
        return self.fc(x.mean(dim=1))


MODELS: dict[str, ModelFactory] = {
    "mlp": MLP,
    "seed-cnn": SeedCNN,
    "vgg11-bn": lambda input_shape, num_classes, **kw: VGG(input_shape, num_classes, depth="vgg11", **kw),
    "vgg16-bn": lambda input_shape, num_classes, **kw: VGG(input_shape, num_classes, depth="vgg16", **kw),
    "resnet20": lambda input_shape, num_classes, **kw: CifarResNet(input_shape, num_classes, depth=20, **kw),
    "resnet56": lambda input_shape, num_classes, **kw: CifarResNet(input_shape, num_classes, depth=56, **kw),
    "mobilenet": MobileNet,
    "lstm": lambda input_shape, num_classes, **kw: RNNClassifier(input_shape, num_classes, cell="lstm", **kw),
    "rnn": lambda input_shape, num_classes, **kw: RNNClassifier(input_shape, num_classes, cell="rnn", **kw),
    "transformer": TransformerClassifier,
}


def _import_factory(path: str) -> ModelFactory:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SecateursError(
            f"model.name: got {path!r}; the factory does not import ({exc}); allowed: "
            f"{', '.join(MODELS)} or 'package.module:factory'"
        ) from None
    if not callable(factory):
        raise SecateursError(f"model.name: got {path!r}; {attr!r} is not callable; allowed: {FACTORY_CONTRACT}")
    return factory


def _call_factory(name: str, factory: ModelFactory, kwargs: dict[str, object]) -> object:
    """``factory(**kwargs)``, or a one-line error naming the factory and the arguments it was
    given when its signature cannot take them (a TypeError raised inside it is left alone)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            label = getattr(factory, "__qualname__", None) or type(factory).__name__
            raise SecateursError(
                f"model.name: got {name!r}; {label}{signature} cannot be called as "
                f"{label}({given}) ({exc}); allowed: {FACTORY_CONTRACT}"
            ) from None
    return factory(**kwargs)


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, **kwargs: object) -> nn.Module:
    """Build a zoo model by name, or a user's model by import path ``package.module:factory``
    (:data:`FACTORY_CONTRACT`: a class or a function taking ``input_shape`` and ``num_classes``).

    >>> build_model("mlp", input_shape=(1, 8, 8), num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if ":" in name:
        factory = _import_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise SecateursError(
            f"model.name: got {name!r}; allowed: {', '.join(MODELS)} or 'package.module:factory'"
        )
    model = _call_factory(name, factory, {"input_shape": tuple(input_shape), "num_classes": num_classes, **kwargs})
    if not isinstance(model, nn.Module):
        raise SecateursError(
            f"model.name: got {name!r}; the factory returned {type(model).__name__}, not an nn.Module; "
            f"allowed: {FACTORY_CONTRACT}"
        )
    return model
