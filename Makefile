# Two commands on a fresh machine: `make demo` (set up + train the default model on Fashion-MNIST)
# and `make test` (the test suite that CI runs). Both set up .venv and the dataset when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

data:
	@test -f $(FASHION_MNIST) || $(SUDO) apt-get install -y dataset-fashion-mnist \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

# The embedded default job: a slimmed NIN on full Fashion-MNIST, 2 CPU cores, about 12 minutes.
demo: setup data
	$(BIN)/micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --epochs 8 --out runs/demo

test: setup data
	$(BIN)/python -m pytest -q --durations=10

test-slow: setup data
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
