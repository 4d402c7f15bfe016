# sparsediff: two commands on a fresh machine.
#   make demo   set up .venv if needed, then run the main demo on bundled data
#   make test   set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparsediff-installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test demo data lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata or the pinned versions change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,tracking]'
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
data:
	@[ -d $(FMNIST) ] || ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist )

test: install data
	$(BIN)/python -m pytest -q

demo: install data
	$(BIN)/sparsediff demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info
