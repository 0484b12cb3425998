"""Deprecated: moved to :mod:`secateurs.prune.surgery.layers` (this alias goes in secateurs 0.3)."""

import warnings

from secateurs.prune.surgery.layers import *  # noqa: F403
from secateurs.prune.surgery.layers import __all__  # noqa: F401

warnings.warn("secateurs.prune.structured_layers is deprecated; import secateurs.prune.surgery.layers", DeprecationWarning, stacklevel=2)
