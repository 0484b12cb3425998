"""A model you already have, for ``secateurs prune``: loading it (a Hugging Face folder, a
safetensors state dict with its factory), reading calibration and evaluation data in the forms
people keep it (text, JSONL, ``.npz`` / safetensors tensors, an image folder), measuring the
pruned model against the dense one, and writing it back in the format it came in.

- :mod:`.models`: :func:`~.models.load_model` and :class:`~.models.LoadedModel` (its ``save``).
- :mod:`.data`: :func:`~.data.read_batches`.
- :mod:`.quality`: perplexity, agreement with the dense model, accuracy.
- :mod:`.report`: ``report.json``, ``report.md``, ``timings.json`` and ``layers.png``.
"""
