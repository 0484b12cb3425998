"""Mean |input| that each weight multiplies: the statistic behind the ``activation`` criterion.

For a weight ``w[o, i]`` of a Linear, the input it multiplies is feature ``i``; for a
convolution it is the input patch element at ``(channel, kernel offset)``, averaged over output
positions (padding, stride, dilation and groups included); for an RNN, ``weight_ih`` multiplies
the layer input and ``weight_hh`` the previous hidden state; for MultiheadAttention, the rows of
``in_proj_weight`` multiply the query, key and value, and ``out_proj.weight`` the attention
output before projection. Forward hooks record the sums only while :meth:`ActivationStats.record`
is active; the model carries no hook otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from secateurs.errors import SecateursError
from secateurs.prune.masks import Target

__all__ = ["ActivationStats"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Stat:
    """Running sum of |input| shaped to broadcast against the weight viewed as ``weight_view``."""

    weight_view: tuple[int, ...]
    input_view: tuple[int, ...]
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None

    def add(self, total: torch.Tensor, count: torch.Tensor | float) -> None:
        total = total.detach().to(torch.float32).reshape(self.input_view)
        count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count


class ActivationStats:
    """Sum and count of |input| per targeted weight, recorded by temporary forward hooks.

    >>> layer = nn.Linear(2, 1)
    >>> stats = ActivationStats(nn.Sequential(layer), [Target("0.weight", "0", "weight", layer)])
    >>> with stats.record():
    ...     _ = layer(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    >>> stats.mean("0.weight")
    tensor([[2., 1.]])
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target]):
        self.model = model
        self.stats: dict[str, _Stat] = {}
        self._by_module: dict[int, tuple[nn.Module, list[Target]]] = {}
        owners = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        for target in targets:
            module = owners.get(id(target.module), target.module)  # out_proj runs inside its MHA
            self._by_module.setdefault(id(module), (module, []))[1].append(target)
            self.stats[target.name] = self._stat_for(module, target)

    @staticmethod
    def _stat_for(module: nn.Module, target: Target) -> _Stat:
        shape = target.shape
        if isinstance(module, nn.Linear):
            return _Stat(shape, (1, shape[1]))
        if isinstance(module, _CONV):
            groups = module.groups
            rest = math.prod(shape[1:])
            return _Stat((groups, shape[0] // groups, rest), (groups, 1, rest))
        if isinstance(module, nn.RNNBase):
            if target.attr.startswith("weight_hr"):
                raise SecateursError(
                    f"criterion: got 'activation' for {target.name}; the LSTM projection input is not "
                    "observable; allowed: exclude it, or use magnitude, gradient or taylor"
                )
            return _Stat(shape, (1, shape[1]))
        if isinstance(module, nn.MultiheadAttention):
            if target.attr == "in_proj_weight":
                e = module.embed_dim
                return _Stat((3, e, shape[1]), (3, 1, shape[1]))
            return _Stat(shape, (1, shape[1]))
        raise SecateursError(
            f"criterion: got 'activation' for {target.name} of a {type(module).__name__}; allowed: "
            "weights of Linear, Conv1d/2d/3d, RNN/LSTM/GRU and MultiheadAttention"
        )

    @contextmanager
    def record(self) -> Iterator[None]:
        """Install the hooks for the duration of the block."""
        handles = []
        try:
            for module, targets in self._by_module.values():
                handles.append(module.register_forward_hook(self._hook(module, targets), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def ready(self) -> bool:
        return bool(self.stats) and all(s.count is not None for s in self.stats.values())

    def missing(self) -> list[str]:
        return [name for name, s in self.stats.items() if s.count is None]

    def mean(self, name: str) -> torch.Tensor:
        """Mean |input| for weight ``name``, shaped to broadcast against its ``weight_view``."""
        stat = self.stats[name]
        assert stat.total is not None and stat.count is not None
        return stat.total / stat.count

    def scores(self, target: Target) -> torch.Tensor:
        """|w| times the mean |input| it multiplies, shaped like the weight."""
        stat = self.stats[target.name]
        weight = target.param.detach()
        mean = self.mean(target.name).to(weight.device)
        return (weight.abs().to(torch.float32).reshape(stat.weight_view) * mean).reshape(weight.shape)

    def _hook(self, module: nn.Module, targets: list[Target]) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            with torch.no_grad():
                if isinstance(mod, nn.Linear):
                    self._linear(mod, args[0] if args else kwargs["input"], targets)
                elif isinstance(mod, _CONV):
                    self._conv(mod, args[0] if args else kwargs["input"], targets)
                elif isinstance(mod, nn.RNNBase):
                    self._rnn(mod, args, kwargs, targets)
                elif isinstance(mod, nn.MultiheadAttention):
                    self._attention(mod, args, kwargs, targets)

        return hook

    def _linear(self, module: nn.Linear, x: torch.Tensor, targets: list[Target]) -> None:
        rows = x.detach().abs().reshape(-1, module.in_features)
        for target in targets:
            self.stats[target.name].add(rows.sum(0, dtype=torch.float32), rows.shape[0])

    def _conv(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, targets: list[Target]) -> None:
        # The gradient of sum(conv(|x|, W)) with respect to W is, for every weight, the sum of the
        # |input| elements it multiplied over all output positions: padding, stride, dilation
        # and groups come out exactly right without reimplementing any of them.
        weight = module.weight
        with torch.enable_grad():
            probe = torch.zeros_like(weight, requires_grad=True)
            out = module._conv_forward(x.detach().abs().to(weight.dtype), probe, None)
            (grad,) = torch.autograd.grad(out, probe, grad_outputs=torch.ones_like(out))
        positions = out.numel() // module.out_channels
        groups = module.groups
        per_group = grad.reshape(groups, module.out_channels // groups, -1)[:, 0]
        for target in targets:
            self.stats[target.name].add(per_group, positions)

    def _rnn(self, module: nn.RNNBase, args: tuple, kwargs: dict, targets: list[Target]) -> None:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(x, PackedSequence):
            raise SecateursError(
                "criterion: got 'activation' with a PackedSequence input to an RNN; allowed: padded "
                "tensor inputs, or the gradient, taylor or magnitude criteria"
            )
        wanted = {t.attr: t for t in targets}
        for attr, layer_input in _rnn_layer_inputs(module, x, hx):
            target = wanted.get(attr)
            if target is not None:
                rows = layer_input.abs().reshape(-1, layer_input.shape[-1])
                self.stats[target.name].add(rows.sum(0, dtype=torch.float32), rows.shape[0])

    def _attention(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, targets: list[Target]) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        bound = dict(zip(names, args, strict=False)) | kwargs
        query, key, value = bound["query"], bound["key"], bound["value"]

        def feature_sum(t: torch.Tensor) -> tuple[torch.Tensor, int]:
            rows = t.detach().abs().reshape(-1, t.shape[-1])
            return rows.sum(0, dtype=torch.float32), rows.shape[0]

        for target in targets:
            stat = self.stats[target.name]
            if target.attr == "in_proj_weight":
                parts = [feature_sum(t) for t in (query, key, value)]
                total = torch.stack([p[0] for p in parts])
                count = torch.tensor([[p[1]] for p in parts], dtype=torch.float32)
                stat.add(total, count.view(3, 1, 1).to(total.device))
            elif target.attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                stat.add(*feature_sum({"q": query, "k": key, "v": value}[target.attr[0]]))
            else:  # out_proj.weight: rerun attention with an identity output projection
                stat.add(*feature_sum(_attention_output(module, query, key, value, bound)))


def _attention_output(
    module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bound: dict
) -> torch.Tensor:
    if module.batch_first and query.dim() == 3:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e = module.embed_dim
    eye = torch.eye(e, dtype=query.dtype, device=query.device)
    out, _ = F.multi_head_attention_forward(
        query, key, value, e, module.num_heads, module.in_proj_weight, module.in_proj_bias,
        module.bias_k, module.bias_v, module.add_zero_attn, 0.0, eye, None, training=False,
        key_padding_mask=bound.get("key_padding_mask"), need_weights=False,
        attn_mask=bound.get("attn_mask"), use_separate_proj_weight=not module._qkv_same_embed_dim,
        q_proj_weight=module.q_proj_weight, k_proj_weight=module.k_proj_weight,
        v_proj_weight=module.v_proj_weight, is_causal=bool(bound.get("is_causal", False)),
    )
    return out


def _rnn_layer_inputs(
    module: nn.RNNBase, x: torch.Tensor, hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, the sequence that weight multiplies) for every layer and direction.

    Layers are rerun one at a time so the inputs of inner layers are seen; the reverse direction
    runs forward over the flipped sequence, which is what PyTorch computes.
    """
    x = x.detach()
    if x.dim() == 2:  # unbatched (T, F)
        x = x.unsqueeze(1)
        hx = None if hx is None else (tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1))
    elif module.batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size or module.hidden_size
    lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, batch, out_size)
        c0 = x.new_zeros(module.num_layers * directions, batch, module.hidden_size)
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            sfx = "_reverse" if direction else ""
            names = [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
            if module.bias:
                names += [f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"]
            if module.proj_size:
                names.append(f"weight_hr_l{layer}{sfx}")
            weights = [getattr(module, n) for n in names]
            index = layer * directions + direction
            h = h0[index : index + 1]
            seq = layer_input.flip(0) if direction else layer_input
            if lstm:
                assert c0 is not None
                out = _VF.lstm(seq, (h, c0[index : index + 1]), weights, module.bias, 1, 0.0, False, False, False)[0]
            elif module.mode == "GRU":
                out = _VF.gru(seq, h, weights, module.bias, 1, 0.0, False, False, False)[0]
            else:
                fn = _VF.rnn_tanh if module.mode == "RNN_TANH" else _VF.rnn_relu
                out = fn(seq, h, weights, module.bias, 1, 0.0, False, False, False)[0]
            yield names[0], seq
            yield names[1], torch.cat([h, out[: steps - 1]], 0)
            outputs.append(out.flip(0) if direction else out)
        layer_input = torch.cat(outputs, -1)
