"""secateurs: gradient clipping and neural-network pruning for PyTorch."""

from secateurs.errors import SecateursError

__version__ = "0.1.0"
__all__ = ["SecateursError", "__version__"]
