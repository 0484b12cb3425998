"""What a model costs: MACs, parameters, bytes and CPU latency, measured the same way everywhere.

Reports compare a dense model with its pruned version, so every number here is taken without
side effects on the model (training flags, gradients and the thread count are restored).

>>> import torch
>>> net = torch.nn.Linear(8, 4)
>>> count_macs(net, torch.zeros(1, 8)), count_params(net)
(36, 36)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from secateurs._tp import op_counter as _op_counter
from secateurs._tp import timm_rules, tp
from secateurs.errors import check
from secateurs.inputs import forward, plain

__all__ = ["MacCounter", "count_macs", "count_macs_by_module", "count_params", "forward", "measure_latency", "state_dict_bytes"]


def _recurrent_macs(module: nn.RNNBase, inputs: tuple, output: Any) -> None:
    """MACs of a recurrent layer: Torch-Pruning's counter reads the wrong axes of the input."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        tokens = x.data.shape[0]
    else:
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    gates = {nn.LSTM: 4, nn.GRU: 3}.get(type(module), 1)
    hidden = module.hidden_size
    out = module.proj_size or hidden
    directions = 2 if module.bidirectional else 1
    per_token = 0
    for k in range(module.num_layers):
        inp = module.input_size if k == 0 else out * directions
        per_token += gates * hidden * (inp + out) + (2 * gates * hidden if module.bias else 0)
        per_token += hidden * out if module.proj_size else 0
    module.__flops__ += int(tokens * per_token * directions)


def _linear_macs(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
    """MACs of a Linear: in x out per row, plus one add per output element for the bias.
    Torch-Pruning's counter adds the bias once per batch, so its per-example figure counted a
    64x256 layer's 64 bias adds as 2 at batch 32."""
    module.__flops__ += int(inputs[0].numel() * module.out_features + (output.numel() if module.bias is not None else 0))


_CUSTOM_RULES = {nn.Linear: _linear_macs} | {t: _recurrent_macs for t in (nn.RNN, nn.LSTM, nn.GRU)}


def _rule(module: nn.Module) -> Any:
    """Torch-Pruning's MAC rule for a module's exact type (ours first), or None."""
    kind = type(module)
    return _CUSTOM_RULES.get(kind) or _op_counter.MODULES_MAPPING.get(kind) or timm_rules().get(kind)


class MacCounter:
    """Counts the MACs of the forward passes run on ``model`` while it is entered, by Torch-Pruning's
    per-module rules (and ours for Linear and recurrent layers), on the model itself: no copy.

    :func:`count_macs` is one forward inside it; :func:`secateurs.prune.structured` counts during
    the dependency-graph trace it runs anyway, so the original size costs no pass of its own.
    The per-example count divides by the batch of the model's first positional input (1 for
    keyword inputs), as Torch-Pruning does.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._counted: list[nn.Module] = []
        self.batch = 0

    def __enter__(self) -> MacCounter:
        def batch(_module: nn.Module, args: tuple, _out: Any) -> None:
            self.batch += len(args[0]) if args else 1

        self._handles.append(self.model.register_forward_hook(batch))
        for m in self.model.modules():
            rule = _rule(m)
            if rule is not None:
                m.__flops__ = 0
                self._counted.append(m)
                self._handles.append(m.register_forward_hook(rule))
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.macs = self._total()
        for h in self._handles:
            h.remove()
        for m in self._counted:
            m.__dict__.pop("__flops__", None)
        self._handles, self._counted = [], []

    def _total(self) -> int:
        def walk(m: nn.Module) -> float:
            if _rule(m) is not None:
                return m.__flops__
            return sum(walk(c) for c in m.children())

        return round(walk(self.model) / self.batch) if self.batch else 0


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass per example (the batch size is divided out).

    Torch-Pruning's ``count_ops_and_params`` rules, with recurrent layers counted per token
    instead of per the counter's mistaken axes. The model runs in eval mode (its training flags
    are restored); nothing is copied.
    """
    training = [(m, m.training) for m in model.modules()]
    try:
        with MacCounter(model.eval()) as counter:
            forward(model, plain(example_inputs))
    finally:
        for m, flag in training:
            m.training = flag
    return counter.macs


def count_macs_by_module(model: nn.Module, example_inputs: Any) -> tuple[int, dict[nn.Module, float]]:
    """:func:`count_macs`, and the same count for every module that has any (a module's count
    includes its submodules').

    Torch-Pruning sums each module's count over the batch but divides its total by the batch;
    the module counts are scaled the same way here, so they add up to the total.

    A Linear's bias adds count once per output element of every example, as a convolution's do
    (Torch-Pruning's own counter adds them once per batch).

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    >>> total, by_module = count_macs_by_module(net, torch.zeros(5, 8))
    >>> total, by_module[net[0]], by_module[net[1]]
    (40, 32.0, 8.0)
    """
    _op_counter.CUSTOM_MODULES_MAPPING = timm_rules() | _CUSTOM_RULES
    macs, _, per_module, _ = tp.utils.count_ops_and_params(model, plain(example_inputs), layer_wise=True)
    whole = per_module.get(model) or 0
    scale = macs / whole if whole else 1.0
    return round(macs), {m: count * scale for m, count in per_module.items() if count}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (parameters and buffers, no file overhead)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> float:
    """Median wall time of one forward pass in milliseconds, in eval mode under ``no_grad``.

    ``warmup`` untimed passes come first; ``threads`` fixes ``torch.set_num_threads`` for the
    measurement (the previous count is restored afterwards, as are the training flags).
    """
    check(isinstance(runs, int) and runs >= 1, "runs", runs, "an integer >= 1")
    check(isinstance(warmup, int) and warmup >= 0, "warmup", warmup, "an integer >= 0")
    check(threads is None or (isinstance(threads, int) and threads >= 1), "threads", threads, "None or an integer >= 1")
    previous_threads = torch.get_num_threads()
    training = [(m, m.training) for m in model.modules()]
    cuda = any(p.is_cuda for p in model.parameters())
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        times = []
        with torch.no_grad():
            for i in range(warmup + runs):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward(model, example_inputs)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0
    finally:
        torch.set_num_threads(previous_threads)
        for m, flag in training:
            m.training = flag
