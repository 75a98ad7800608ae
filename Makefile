# `make demo` and `make test` are the two commands a newcomer runs; both install first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
REQS    := requirements.txt requirements-test.txt pyproject.toml
STAMP   := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
# lmms-eval (eval.harness: lmms-eval) pulls many packages: only `make test` (its test) installs it
EVAL_STAMP := $(VENV)/.installed-eval-$(shell cat $(REQS) requirements-eval.txt | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install install-eval install-gpu test test-fast demo bench clean

install: $(STAMP)

$(STAMP): $(REQS)
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# CUDA machines: sglang, with requirements.txt as constraints so that no pin of ours moves (its
# torch, transformers, tokenizers and numpy needs equal them), then Transformer Engine: its torch
# extension is an sdist that compiles against the installed torch, so it must see it
# (--no-build-isolation) and the build tools its setup.py imports without declaring (wheel).
install-gpu: install
	$(BIN)/pip install -q -c requirements.txt $$(grep -E '^sglang' requirements-gpu.txt)
	$(BIN)/pip install -q wheel ninja packaging
	$(BIN)/pip install -q --no-build-isolation -c requirements.txt \
		$$(grep -E '^transformer-engine' requirements-gpu.txt)
	$(BIN)/pip check
	$(BIN)/python -c "import sglang, transformer_engine.pytorch; print('gpu extras: sglang', sglang.__version__)"

install-eval: $(EVAL_STAMP)

$(EVAL_STAMP): $(STAMP) requirements-eval.txt
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt -r requirements-eval.txt
	@rm -f $(VENV)/.installed-eval-*
	@touch $@

test: install install-eval
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
