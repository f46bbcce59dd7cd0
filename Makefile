# Two entry points for a fresh machine (Debian, Python 3.11, root or sudo):
#   make demo   -- install what is missing, then run the main job on Fashion-MNIST
#   make test   -- install what is missing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT ?= runs/demo

.PHONY: demo test lint setup clean mutation

demo: $(BIN)/.installed $(FMNIST)
	$(BIN)/aikd demo -o $(OUT)

test: $(BIN)/.installed $(FMNIST)
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) runs
