"""One-shot pruning of a trained model from calibration data: the place for Wanda, SparseGPT and OWL.

Reserved by the layout: the pieces that prune a pretrained model layer by layer from a few
hundred calibration examples (per-layer input statistics and Hessians, the optimal-brain-surgeon
weight update, outlier-weighted per-layer sparsities) land here, beside :mod:`..criteria`
(scores for masks during training) and :mod:`..surgery` (structured removal). Nothing is
implemented here yet; ``secateurs.prune.oneshot`` will be the entry point.
"""

__all__: list[str] = []
