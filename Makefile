# Every target works from a fresh clone: it installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTO_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
# 8 fake CPU devices, so multi-device code runs everywhere.
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: help install test demo bench bench-data data lint tensorboard clean

help:  ## List the targets
	@echo "make TARGET, each usable on a fresh clone (installs what it needs):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) \
	  | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 16

install: $(VENV)/.installed  ## Create .venv with the pinned requirements

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	@# The emoji dataset's images come from Debian's Noto Color Emoji font.
	@if [ ! -f $(NOTO_FONT) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq fonts-noto-color-emoji) \
	      || echo "warning: could not install fonts-noto-color-emoji"; \
	  else \
	    echo "note: run 'sudo apt-get install fonts-noto-color-emoji' for the emoji dataset"; \
	  fi; \
	fi
	touch $@

test: install  ## Run the tests (CPU, 8 fake devices)
	$(FAKE_DEVICES) $(PY) -m pytest -q tests

demo: install  ## Train configs/demo.py on the emoji data, print results
	$(PY) -m clip_jax.demo --workdir runs/demo

bench: install  ## Benchmarks -> runs/bench.json
	@# One device, as `make demo` trains.
	$(PY) -m clip_jax.bench --out runs/bench.json

data: install  ## Prepare the built-in emoji dataset
	$(PY) -m clip_jax.data.sources prepare-emoji

bench-data: install  ## Input-pipeline benchmark -> runs/data_bench.json
	$(PY) -m clip_jax.data.bench --fresh --out runs/data_bench.json

lint: install  ## ruff check
	$(VENV)/bin/ruff check clip_jax configs tests

# TensorBoard over every run under RUNS (default runs/).
RUNS ?= runs
tensorboard: install  ## View the runs under RUNS=runs in TensorBoard
	$(VENV)/bin/tensorboard --logdir $(RUNS) --host 127.0.0.1

clean:  ## Remove .venv, runs/ and caches
	rm -rf $(VENV) runs .pytest_cache
