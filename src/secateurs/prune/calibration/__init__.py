"""One-shot pruning of a trained model from calibration data: Wanda, SparseGPT and OWL.

Where things live (one idea per module):

- :mod:`.stats`: a layer's inputs as a matrix (Conv via ``unfold``) and their float32 sums
  (``H = X^T X``, ``sum x^2``, ``sum |x|``), padding positions skipped.
- :mod:`.capture`: blocks (found without per-architecture code) and the sequential calibration
  that feeds each block the outputs of the already-pruned blocks before it.
- :mod:`.wanda`: scores without a weight update (magnitude, Wanda, activation) and their masks.
- :mod:`.sparsegpt`: the optimal-brain-surgeon update, with its dampening made visible.
- :mod:`.owl`: outlier-weighted per-layer sparsities.
- :mod:`.oneshot`: the entry point, :func:`oneshot`; :mod:`.results` what it returns.

>>> import torch
>>> from torch import nn
>>> from secateurs import prune
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> result = prune.oneshot(model, [torch.randn(8, 16) for _ in range(4)], method="sparsegpt", pattern="2:4")
>>> round(result.sparsity, 3)
0.5
"""

from secateurs.prune.calibration.capture import empty_weights
from secateurs.prune.calibration.oneshot import GROUPS, METHODS, oneshot, oneshot_streamed
from secateurs.prune.calibration.owl import OWL
from secateurs.prune.calibration.results import LayerResult, OneshotResult

__all__ = ["GROUPS", "METHODS", "OWL", "LayerResult", "OneshotResult", "empty_weights", "oneshot", "oneshot_streamed"]
