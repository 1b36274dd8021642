# make train: set up (venv, CPU torch where none is installed, the package) and run the default experiment.
# make test:  set up with the dev extra and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip keeps an installed torch (e.g. a CUDA build installed first); otherwise this one is installed.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n auto -q

.PHONY: setup setup-dev train test clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .

setup-dev: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"

train: setup
	$(PY) train.py $(ARGS)

test: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

clean:
	rm -rf logs outputs multirun wandb .pytest_cache
