# `make demo` and `make test` are the two commands a newcomer runs; both install first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
REQS    := requirements.txt requirements-test.txt pyproject.toml
STAMP   := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): $(REQS)
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything except the tests marked slow (torchrun / multi-process, or over ~20 s): minutes.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m prism_megatron.demo --out demo_out

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out .pytest_cache
