# Two commands do everything on a fresh machine: `make demo` and `make test` (each installs first, idempotently).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines pin the CPU wheel; GPU users: make TORCH_SPEC='torch' (CUDA build), see environment.yml.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp for this CPU (-march=native), without its AMX kernels on x86_64: built by
# GCC 12 they crash at the first quantized matmul of an AMX CPU (SIGSEGV in ggml_backend_amx_mul_mat; cause and
# fix in llamaduo_nb/llamacpp.py, applied to the llama-server that `llamaduo prepare` builds, which serves every
# model; the wheel only tokenizes and quantizes). pip's wheel cache does not know build flags, so the wheel is
# built once per CPU into the project's cache.
LLAMA_CPP_PYTHON := $(shell grep -oE 'llama-cpp-python==[0-9.]+' pyproject.toml)
CPU_TAG    := $(shell (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo) | sha256sum | cut -c1-10)
NO_AMX     := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
WHEELHOUSE := $(or $(LLAMADUO_CACHE),$(HOME)/.cache/llamaduo_nb)/wheels/$(CPU_TAG)-noamx
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast bench lint format lab validate-teachers docs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	@ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	  echo "building $(LLAMA_CPP_PYTHON) for this CPU (first time on a machine: ~5-16 min; cached in $(WHEELHOUSE))"; \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(WHEELHOUSE) '$(LLAMA_CPP_PYTHON)'; }
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q --find-links $(WHEELHOUSE) -e '.[dev]'
	@# the project kernel: in the venv (for `make lab`, Papermill) and per user, where a JupyterLab the user
	@# already runs looks (`jupyter kernelspec list` shows both)
	$(BIN)/python -m ipykernel install --sys-prefix --name llamaduo-nb --display-name "Python (llamaduo-nb)" >/dev/null
	$(BIN)/python -m ipykernel install --user --name llamaduo-nb --display-name "Python (llamaduo-nb)" >/dev/null
	$(BIN)/llamaduo prepare
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llamaduo run params/demo.yaml --fresh

# JupyterLab at the project root, reachable from this machine only; notebooks/ holds the stages
lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

# The suite on every core, at most 4 workers (pytest-xdist; the longest tests start first, see tests/conftest.py;
# beyond 4 the whole-loop test alone sets the time). TEST_WORKERS=1: one process, as plain `pytest` runs it.
# Torch threads are left to torch (one per core in each worker): on 2 cores, OMP_NUM_THREADS=1 measured the same.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal)

test: $(STAMP)
	$(PYTEST)

# The inner loop: the unit tier, every test not marked `slow` (no fine-tuning, no end-to-end notebook, no browser)
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	nice -n 0 $(BIN)/python -m benches $(BENCH_ARGS)

# A small committed gallery of the last demo run (docs/demo/): summary, Table 1, plots.
docs: $(STAMP)
	$(BIN)/python -m llamaduo_nb.gallery outputs/demo docs/demo

# A proxy of the teacher study's ground truth (the CAR paper's Table 4 layout): a short LoRA per candidate teacher, judged like 04.
validate-teachers: $(STAMP)
	$(BIN)/llamaduo validate-teachers params/demo.yaml

# style (ruff) and the architecture contract (import-linter: the ladder of layers, no import circles)
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-logo
