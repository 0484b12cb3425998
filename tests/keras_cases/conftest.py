"""Settings of the Keras case processes (tests/test_keras.py runs them, one per backend).

On the JAX and torch backends, Keras imports TensorFlow whenever it is installed, only to seed
its RNG (``keras.utils.set_random_seed``) and to look for TensorFlow types when serialising
(``model.save``): 10 s of a loaded 2-core machine per process for nothing these backends use.
Those processes see Keras as a JAX-only or torch-only install does: TensorFlow absent.
"""

from __future__ import annotations

import sys

import keras
from keras.src.utils import module_utils

if keras.backend.backend() != "tensorflow":
    module_utils.tensorflow._available = False  # what Keras records when the import fails

    def pytest_sessionfinish(session, exitstatus):
        assert "tensorflow" not in sys.modules, "TensorFlow was imported after all"
