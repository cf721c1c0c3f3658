# Two user commands: `make demo` and `make test`. Both build .venv/ first (once).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-indexes bench

venv: $(STAMP)

# Idempotent: reinstalls only when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sae-cafe demo

test: $(STAMP)
	$(VENV)/bin/ruff check sae_cafe sae_training app tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check sae_cafe sae_training app tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_srd.py

clean-indexes:
	rm -rf indexes/*/
