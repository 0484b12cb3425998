"""Deprecated: moved to :mod:`secateurs.prune.surgery.criteria` (this alias goes in secateurs 0.3)."""

import warnings

from secateurs.prune.surgery.criteria import *  # noqa: F403
from secateurs.prune.surgery.criteria import __all__  # noqa: F401

warnings.warn("secateurs.prune.structured_criteria is deprecated; import secateurs.prune.surgery.criteria", DeprecationWarning, stacklevel=2)
