# Two commands do everything on a fresh machine: `make demo` and `make test` (each installs first, idempotently).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines pin the CPU wheel; GPU users: make TORCH_SPEC='torch' (CUDA build), see environment.yml.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test bench lint format

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	@echo "installing llamaduo-nb (first time on a machine: llama-cpp-python compiles, ~16 min; cached after)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name llamaduo-nb --display-name "Python (llamaduo-nb)" >/dev/null
	$(BIN)/llamaduo prepare
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llamaduo run params/demo.yaml --fresh

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	nice -n 0 $(BIN)/python -m benches $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
