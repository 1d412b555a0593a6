# Two entry points (see README): `make demo` and `make test`.
# Each creates its own virtual environment in .venv (override with VENV=...).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpg.tar.gz
OUT ?= out

.PHONY: demo test venv clean

$(BIN)/imgsim: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/imgsim

demo: venv
	$(BIN)/imgsim weights
	$(BIN)/imgsim embed --backbone resnet50 --data $(DATA) --split test --max-per-class 50 --input-size 64 --out $(OUT)/demo-embeddings.npz

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
