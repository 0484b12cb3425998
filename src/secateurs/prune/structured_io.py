"""Deprecated: moved to :mod:`secateurs.prune.surgery.checkpoint` (this alias goes in secateurs 0.3)."""

import warnings

from secateurs.prune.surgery.checkpoint import *  # noqa: F403
from secateurs.prune.surgery.checkpoint import __all__  # noqa: F401

warnings.warn("secateurs.prune.structured_io is deprecated; import secateurs.prune.surgery.checkpoint", DeprecationWarning, stacklevel=2)
