"""The experiment layer: data, models, the training loop, runs, sweeps and reports.

Library code (``secateurs.clip``, ``secateurs.prune``) never imports from here.
"""
