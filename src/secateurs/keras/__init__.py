"""secateurs for Keras 3: clipping rules, a NaN guard and pruning masks on TF, JAX and PyTorch.

An optional extra (``pip install secateurs[keras]``); importing :mod:`secateurs` never imports
Keras. Set ``KERAS_BACKEND`` before importing it, as for Keras itself::

    import keras, secateurs.keras as sk
    opt = sk.wrap(keras.optimizers.AdamW(1e-3), sk.GlobalNorm(1.0), nonfinite="skip")
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, callbacks=[sk.PolynomialDecay(final_sparsity=0.9, end_step=1000)])

Where things live: ``rules`` (GlobalNorm, Norm, Value, AGC), ``autoclip``, ``zclip``,
``adagc`` (adaptive rules), ``optimizer`` (:func:`wrap`), ``logs`` (stats into ``fit``'s
logs), ``layers`` (which weights of which layer types are prunable), ``criteria`` (scores),
``selection`` (scores -> masks), ``schedules`` (pruning callbacks), ``export`` (``strip``,
sparse save, report).
"""

from __future__ import annotations

try:
    import keras as _keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "secateurs.keras needs Keras 3: pip install 'secateurs[keras]' (and a backend: "
        "torch, jax[cpu] or tensorflow-cpu)"
    ) from exc

if int(_keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(f"secateurs.keras needs Keras 3, found keras {_keras.__version__}")

from secateurs.keras.adagc import AdaGC
from secateurs.keras.autoclip import AutoClip
from secateurs.keras.criteria import CRITERIA
from secateurs.keras.export import load_sparse, save_sparse, sparsity_report, strip, to_markdown
from secateurs.keras.layers import PRUNABLE, prunable_targets, register_layer
from secateurs.keras.logs import ClipStatsLogger
from secateurs.keras.optimizer import NONFINITE, ClippedOptimizer, NonFiniteGradError, wrap
from secateurs.keras.rules import (
    AGC,
    RULES,
    Chain,
    GlobalNorm,
    Norm,
    Rule,
    Value,
    build_rule,
    register,
)
from secateurs.keras.schedules import (
    ConstantSparsity,
    Iterative,
    OneShot,
    PolynomialDecay,
    PruningSchedule,
    prune_now,
)
from secateurs.keras.stats import ClipStats
from secateurs.keras.zclip import ZClip

__all__ = [
    "AGC",
    "CRITERIA",
    "NONFINITE",
    "PRUNABLE",
    "RULES",
    "AdaGC",
    "AutoClip",
    "Chain",
    "ClipStats",
    "ClipStatsLogger",
    "ClippedOptimizer",
    "ConstantSparsity",
    "GlobalNorm",
    "Iterative",
    "NonFiniteGradError",
    "Norm",
    "OneShot",
    "PolynomialDecay",
    "PruningSchedule",
    "Rule",
    "Value",
    "ZClip",
    "build_rule",
    "load_sparse",
    "prunable_targets",
    "prune_now",
    "register",
    "register_layer",
    "save_sparse",
    "sparsity_report",
    "strip",
    "to_markdown",
    "wrap",
]
