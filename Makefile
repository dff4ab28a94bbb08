# Fresh machine: `make demo` (set up + offline main job) or `make test` (set up + tests).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m retrieval.data.synthetic data/synthetic --num-images 48
	$(VENV)/bin/retrieval eval demo

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check retrieval tests bench tools

clean:
	rm -rf runs data/synthetic .pytest_cache
