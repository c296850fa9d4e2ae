# The two README commands: `make demo` and `make test`. Both create (or reuse) .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-load test-browser test-compose test-ray-cluster test-benchmark gpu-check bench venv clean

# Re-install only when the dependency list changes; the stamp is written after a successful install.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	@# pip compiles the 5 GB of modules one file at a time (about 60 s here); both cores take half of that.
	@# One file of torch's own tests is Python 3.12 syntax and never compiles: pip ignores it, and so do we.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	$(BIN)/python -c "import torch, torchvision, flwr, ray; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'flwr', flwr.__version__)"
	touch $(STAMP)

venv: $(STAMP)

# Our own modules compiled once, up front: where PYTHONDONTWRITEBYTECODE is set (it is on these boxes), every
# process would compile them again at import (0.7 CPU-s each, measured), and a run starts dozens of processes.
COMPILE_SOURCES := $(BIN)/python -m compileall -q fedreid reid strategies clients server tests bench >/dev/null

## A small federation of three synthetic camera sites on the Ray simulation engine, and a fourth
## site held out (it never trains; every evaluation ranks the global model on its cameras).
demo: $(STAMP)
	$(COMPILE_SOURCES)
	$(BIN)/fedreid-sim --profile demo --sites 4 --overrides "federation.held_out=[3-airport]"

## The test suite (unit tests plus real end-to-end Flower simulations).
test: $(STAMP)
	$(COMPILE_SOURCES)
	$(BIN)/python -m pytest -q --durations=12

## Load tests (not in `make test`): 20 SuperNodes over TLS, 100 simulated sites; figures on stdout.
test-load: $(STAMP)
	$(BIN)/python -m pytest -m load -s -q

## report.html rendered by headless Chromium (Debian's chromium package, installed here when missing);
## the screenshot lands in outputs/report-screenshot.png.
test-browser: $(STAMP)
	command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(BIN)/python -m pytest -m browser -s -q

## `docker compose up` on a real Docker engine: deploy/docker-setup.sh installs and starts Debian's
## docker.io, the Compose plugin and a Debian-built base image where they are missing (says which).
test-compose: $(STAMP)
	$(BIN)/python -m pytest -m compose -s -q --durations=0

## A simulation on a two-node Ray cluster started on this machine (`ray start`, one CPU per node).
test-ray-cluster: $(STAMP)
	$(BIN)/python -m pytest -m ray_cluster -s -q --durations=0

## The fedreid9 preset end to end: miniatures of the nine releases -> fedreid-prepare -> a nine-site simulation.
test-benchmark: $(STAMP)
	$(BIN)/python -m pytest -m benchmark -s -q --durations=0

## On a CUDA machine: the tests that need no Ray, then a TLS deployment per algorithm with ResNet-50 on the GPU.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

## Benchmarks (slow; numbers go to stdout). The algorithm comparison is separate:
## $(BIN)/python bench/compare_algorithms.py --seeds 0 1 2   (about 2 hours on 2 CPU cores)
## $(BIN)/python bench/compare_algorithms.py --federation synthetic-fedreid9 --seeds 0 1 2   (nine sites, two held out)
bench: $(STAMP)
	$(BIN)/python bench/eval_speed.py
	$(BIN)/python bench/sparse_codec.py
	$(BIN)/python bench/round_overhead.py

clean:
	rm -rf .flwr outputs data/synthetic
