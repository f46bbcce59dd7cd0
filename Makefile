# Two entry points for a fresh machine (Debian, Python 3.11, root or sudo):
#   make demo   -- install what is missing, then run the main job on Fashion-MNIST
#   make test   -- install what is missing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT ?= runs/demo

.PHONY: demo test test-oldest lint setup clean mutation

# The oldest torch pyproject.toml allows, in its own venv: the data-parallel and resume tests on it
# (docs/results/torch_versions.md has the whole suite on each tested release).
OLDEST := .venv-oldest
OLDEST_TORCH := torch==2.11.0 torchvision==0.26.0
OLDEST_TESTS := tests/test_compat.py tests/test_distributed.py tests/test_checkpoint.py \
	tests/test_training.py::test_resume_continues_to_the_same_result \
	tests/test_training.py::test_resume_refuses_a_changed_config

demo: $(BIN)/.installed $(FMNIST)
	$(BIN)/aikd demo -o $(OUT)

test: $(BIN)/.installed $(FMNIST)
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST)/bin/.installed $(FMNIST)
	$(OLDEST)/bin/python -m pytest -q $(OLDEST_TESTS)

mutation: $(BIN)/.installed
	scripts/mutation.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests scripts examples

setup: $(BIN)/.installed $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(OLDEST)/bin/.installed: pyproject.toml
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q $(OLDEST_TORCH)
	$(OLDEST)/bin/python -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) $(OLDEST) runs
