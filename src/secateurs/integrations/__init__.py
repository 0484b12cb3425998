"""Glue to training frameworks; each module imports its framework only when it is imported.

* :mod:`~secateurs.integrations.lightning` - PyTorch Lightning callbacks ``GradientClipping``
  and ``Pruning`` (install the extra: ``pip install 'secateurs[lightning]'``).
"""
