# Two commands on a fresh machine: `make demo` (set up + run the default pipeline on Fashion-MNIST)
# and `make test` (ruff, then the test suite: what CI runs). Both set up .venv and the dataset when missing.
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

# The embedded default job: FP32 → prune → quantize (6 schemes) → ONNX → ONNX Runtime → report, on
# Fashion-MNIST, 2 CPU cores, about 15 minutes; writes runs/default/report.md. Re-running resumes.
demo: setup data
	$(BIN)/micronet pipeline --config configs/default.yaml

# The linter first (config in pyproject.toml), so a style or import error fails fast, then the suite.
test: setup data
	$(BIN)/ruff check micronet tests bench
	$(BIN)/python -m pytest -q --durations=10

test-slow: setup data
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
