# sam-batch: make install | demo | test | bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch from this machine's disk; an unpinned torch would pull a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e '.[test,demo,s3]'
	touch $@

demo: install
	$(PY) -m sam_batch.demo

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"
