# Every target works from a fresh clone: it installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTO_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
SYMBOLA_FONT := /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf
# 8 fake CPU devices, so multi-device code runs everywhere.
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
# Host buffers on huge pages (clip_jax/host_malloc.py; entry points add it
# themselves by a re-exec, pytest needs it from the start).
HUGE_PAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1
# pytest workers (pytest-xdist); whole files go to one worker, so module
# fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: help install test demo bench bench-step bench-compare bench-loss bench-32k bench-memory bench-data bench-index data lint tensorboard clean

help:  ## List the targets
	@echo "make TARGET, each usable on a fresh clone (installs what it needs):"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) \
	  | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' | expand -t 16

install: $(VENV)/.installed  ## Create .venv with the pinned requirements

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	@# The emoji dataset's images come from Debian's Noto Color Emoji font
	@# (training style) and Symbola (the `symbola` validation style).
	@if [ ! -f $(NOTO_FONT) ] || [ ! -f $(SYMBOLA_FONT) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq fonts-noto-color-emoji fonts-symbola) \
	      || echo "warning: could not install fonts-noto-color-emoji fonts-symbola"; \
	  else \
	    echo "note: run 'sudo apt-get install fonts-noto-color-emoji fonts-symbola' for the emoji dataset"; \
	  fi; \
	fi
	touch $@

test: install  ## Run the tests (CPU, 8 fake devices)
	$(FAKE_DEVICES) $(HUGE_PAGES) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

demo: install  ## Train configs/demo.py on the emoji data, print results
	$(PY) -m clip_jax.demo --workdir runs/demo

bench: install  ## Benchmarks -> runs/bench.json
	@# One device, as `make demo` trains.
	$(PY) -m clip_jax.bench --out runs/bench.json

bench-step: install  ## Train-step ex/s, FLOPs, share of matmul peak (demo, B/32) -> runs/bench_step_*.json
	@# One device; medians of timed windows after compilation.
	$(PY) -m clip_jax.bench step --model demo --batch 256 \
	  --out runs/bench_step_demo.json
	$(PY) -m clip_jax.bench step --model b32 --batch 64 --windows 3 \
	  --steps_per_window 2 --out runs/bench_step_b32.json

bench-compare: install  ## clip_jax vs open_clip train step, same architecture, alternated -> runs/bench_compare.json
	@# torch + open_clip come from requirements-dev.txt (already in .venv,
	@# never runtime deps), so no second venv; not part of `make test`.
	$(PY) -m clip_jax.bench_compare --models demo:256,b32:64 --rounds 3 \
	  --out runs/bench_compare.json

bench-loss: install  ## Every loss at a 32K batch on 8 fake devices -> runs/bench_loss.json
	@# Forward+backward of every loss at a 32K global batch on 8 fake devices
	@# (tens of minutes on 2 cores); exits non-zero if a target FAILs.
	$(PY) -m clip_jax.bench loss --global_batch 32768 --embed_dim 512 \
	  --devices 8 --out runs/bench_loss.json

bench-32k: install  ## Training steps at a 32K batch on 8 fake devices
	@# Real training steps at a 32,768 global batch (tiny towers, 32 px,
	@# accum_steps 4) on 8 fake devices, loss checked against float64.
	$(PY) -m clip_jax.bench step32k --devices 8 --accum_steps 4 \
	  --out runs/bench_step32k.json

bench-memory: install  ## Memory levers (FSDP, remat, bf16, scan, accum) -> runs/bench_memory.json
	@# Per-device compiled memory and ms/step of the demo model's train step
	@# on 8 fake devices, one lever at a time from a baseline, then combined.
	$(PY) -m clip_jax.bench memory --devices 8 --repeats 5 \
	  --out runs/bench_memory.json

bench-index: install  ## faiss kinds: recall@10 and QPS, demo run's openmoji images + 1M synthetic -> runs/bench_index.json
	@# Needs a trained runs/demo (make demo). Passive OpenMP waits: on a
	@# busy machine spinning faiss threads crawl (README "Retrieval index").
	@test -f runs/demo/config.json || { echo "train runs/demo first: make demo"; exit 2; }
	$(PY) -m clip_jax.index build --workdir runs/demo --split openmoji \
	  --out runs/demo/openmoji.index --overwrite
	OMP_WAIT_POLICY=PASSIVE $(PY) -m clip_jax.index report \
	  --index runs/demo/openmoji.index --synthetic 1000000 --queries 200 \
	  --runs 3 --out runs/bench_index.json

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
