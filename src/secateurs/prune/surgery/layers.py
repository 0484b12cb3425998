"""Layer surgery that Torch-Pruning lacks or gets wrong: recurrent layers and attention heads.

Torch-Pruning's dependency graph calls one pruning function per layer type. Two of its own are
not usable here: its LSTM function indexes ``weight_hh`` with the wrong rows (it fails on any
LSTM), and plain ``nn.RNN``/``nn.GRU`` have none. Its ``nn.MultiheadAttention`` function removes
embedding channels but leaves ``num_heads`` unchanged, so removing whole heads breaks the module.
The pruners below replace them; :func:`secateurs.prune.structured` registers them with
every graph it builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

__all__ = [
    "RECURRENT_TYPES",
    "AttentionHeadPruner",
    "RecurrentPruner",
    "customized_pruners",
    "heads_of",
    "recurrent_gates",
    "sync_attributes",
]

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)


def recurrent_gates(layer: nn.RNNBase) -> int:
    """Stacked gate blocks in the layer's weight rows: 4 for LSTM, 3 for GRU, 1 for RNN."""
    if isinstance(layer, nn.LSTM):
        return 4
    if isinstance(layer, nn.GRU):
        return 3
    return 1


def _keep(total: int, idxs: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(total) if i not in drop], dtype=torch.long)


def _select(param: torch.Tensor, dim: int, keep: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding ``param`` restricted to ``keep`` along ``dim`` (grad carried over)."""
    keep = keep.to(param.device)
    out = nn.Parameter(param.data.index_select(dim, keep).contiguous(), requires_grad=param.requires_grad)
    if param.grad is not None:
        out.grad = param.grad.index_select(dim, keep).contiguous()
    return out


class RecurrentPruner(tp.pruner.BasePruningFunc):
    """Removes hidden units from ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (any number of layers).

    A hidden unit ``j`` owns row ``j`` of every gate block in ``weight_ih``/``weight_hh``/biases
    and column ``j`` of ``weight_hh``; in a stack, the same unit is removed from every layer
    (``hidden_size`` is one number for the whole module) and from the next layer's inputs.
    Bidirectional layers and ``proj_size`` are refused: their output interleaves two unit sets.
    """

    TARGET_MODULES = RECURRENT_TYPES

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.bidirectional or layer.proj_size:
            raise ValueError(
                f"{type(layer).__name__}(bidirectional={layer.bidirectional}, proj_size={layer.proj_size}) "
                "hidden units cannot be removed; only unidirectional layers without proj_size"
            )
        hidden = layer.hidden_size
        keep = _keep(hidden, idxs)
        rows = torch.cat([keep + g * hidden for g in range(recurrent_gates(layer))])
        for k in range(layer.num_layers):
            w_ih = _select(getattr(layer, f"weight_ih_l{k}"), 0, rows)
            if k > 0:
                w_ih = _select(w_ih, 1, keep)
            setattr(layer, f"weight_ih_l{k}", w_ih)
            w_hh = _select(_select(getattr(layer, f"weight_hh_l{k}"), 0, rows), 1, keep)
            setattr(layer, f"weight_hh_l{k}", w_hh)
            if layer.bias:
                for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                    setattr(layer, name, _select(getattr(layer, name), 0, rows))
        layer.hidden_size = len(keep)
        layer._init_flat_weights()
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.input_size, idxs)
        suffixes = ("", "_reverse") if layer.bidirectional else ("",)
        for sfx in suffixes:
            name = f"weight_ih_l0{sfx}"
            setattr(layer, name, _select(getattr(layer, name), 1, keep))
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size


class AttentionHeadPruner(tp.pruner.function.MultiheadAttentionPruner):
    """Removes whole heads from ``nn.MultiheadAttention`` and updates ``num_heads``.

    ``nn.MultiheadAttention`` ties its query input, each projection and its output to one
    ``embed_dim = num_heads * head_dim``, so removing head ``h`` removes embedding channels
    ``h*head_dim .. (h+1)*head_dim - 1`` everywhere those channels are coupled (the residual
    stream of a Transformer). Indices that do not form whole heads are refused.
    """

    def check(self, layer: nn.Module, idxs: Sequence[int], to_output: bool) -> None:
        heads_of(layer, idxs)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        heads = heads_of(layer, idxs)
        head_dim = layer.head_dim
        idxs = sorted(int(i) for i in idxs)
        super().prune_out_channels(layer, idxs)
        layer.num_heads -= len(heads)
        layer.head_dim = head_dim
        return layer

    prune_in_channels = prune_out_channels


def heads_of(layer: nn.MultiheadAttention, idxs: Sequence[int]) -> list[int]:
    """The heads that ``idxs`` (embedding channels) cover; raises unless they are whole heads."""
    head_dim = layer.head_dim
    heads = sorted({int(i) // head_dim for i in idxs})
    if len(set(int(i) for i in idxs)) != len(heads) * head_dim:
        raise ValueError(
            f"MultiheadAttention(embed_dim={layer.embed_dim}, num_heads={layer.num_heads}): "
            f"channels {sorted(idxs)[:8]}... are not whole heads of {head_dim} channels"
        )
    if len(heads) >= layer.num_heads:
        raise ValueError(f"MultiheadAttention: cannot remove all {layer.num_heads} heads")
    return heads


def sync_attributes(model: nn.Module) -> list[str]:
    """After surgery, set the plain attributes that a module's ``forward`` reads and that copy a
    layer's width (Torch-Pruning leaves them stale); returns ``"name.attr"`` for each one changed.

    - torchvision ``VisionTransformer.hidden_dim`` (its input reshape) = ``conv_proj.out_channels``;
    - torchvision ``EncoderBlock.num_heads`` = its attention's ``num_heads``;
    - any module holding an ``nn.MultiheadAttention`` as ``self_attention`` or ``attn`` with its own
      ``num_heads``/``embed_dim``/``hidden_dim`` copies.
    """
    changed = []
    for name, m in model.named_modules():
        updates: dict[str, int] = {}
        proj = getattr(m, "conv_proj", None)
        if isinstance(proj, nn.modules.conv._ConvNd) and isinstance(m.__dict__.get("hidden_dim"), int):
            updates["hidden_dim"] = proj.out_channels
        for child in ("self_attention", "self_attn", "attn", "attention"):
            mha = getattr(m, child, None)
            if isinstance(mha, nn.MultiheadAttention):
                for attr, value in (("num_heads", mha.num_heads), ("embed_dim", mha.embed_dim), ("hidden_dim", mha.embed_dim)):
                    if isinstance(m.__dict__.get(attr), int):
                        updates[attr] = value
        for attr, value in updates.items():
            if m.__dict__[attr] != value:
                setattr(m, attr, value)
                changed.append(f"{name}.{attr}" if name else attr)
    return changed


def customized_pruners() -> dict[type[nn.Module], tp.pruner.BasePruningFunc]:
    """The pruners :func:`structured` registers with Torch-Pruning's dependency graph."""
    recurrent = RecurrentPruner()
    pruners: dict[type[nn.Module], tp.pruner.BasePruningFunc] = {t: recurrent for t in RECURRENT_TYPES}
    pruners[nn.MultiheadAttention] = AttentionHeadPruner()
    return pruners
