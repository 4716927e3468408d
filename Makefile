# Two entry points (see README): `make demo` and `make test`. Each creates or updates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is a test-time reference only (HF logit parity); pinned so pip
# does not pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# ml_dtypes 0.7.0 (numpy 2.4) takes 0.5 s to import (its ufunc loop registration: quadratic
# PyUFunc_AddLoop scans), 0.07 s for 0.6.0; every process that imports jax pays it (~150 test
# subprocesses). A pin of this environment only: the package itself accepts what jax accepts.
PINS ?= 'ml_dtypes<0.7'
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: setup demo test bench

$(VENV)/.core: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) . $(PINS)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) '$(TORCH)' '.[test,hf,ray,search,wandb,eval]' $(PINS)
	touch $@

setup: $(VENV)/.core

# Train the default model on the embedded corpus (this interpreter's standard library), then sample.
demo: $(VENV)/.core
	$(BIN)/python train.py --config=configs/default.py --workdir=runs/default
	$(BIN)/python sample.py --workdir=runs/default --prompt='def parse_args(' --max_new_tokens=300 --temperature=0.7 --top_k=40

# glibc.malloc.hugetlb=1: see workdir/hostenv.py (the CLIs set it themselves).
# One pytest-xdist worker a core (at most 8); tests/conftest.py groups the tests that share a
# module fixture or a README workdir and sends the slow ones first. XDIST= runs in one process.
XDIST ?= -n auto --maxprocesses=8 --dist loadgroup --no-loadscope-reorder
test: $(VENV)/.test
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing.' >&2; fi; exit $$rc
