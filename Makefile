# sam-batch: make install | demo | test | bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch from this machine's disk; an unpinned torch would pull a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench bench-env bench-memory

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e '.[test,demo,s3,onnx]'
	touch $@

demo: install
	$(PY) -m sam_batch.demo

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The reference generator (MobileSAM's SamAutomaticMaskGenerator) in its own environment,
# never in $(VENV): `make bench` runs it and sam-batch side by side (sam_batch/bench.py).
REF_VENV ?= .venv-ref
REF_TORCH ?= torch==2.14.1 torchvision==0.29.1

bench-env: $(REF_VENV)/.installed

$(REF_VENV)/.installed:
	test -x $(REF_VENV)/bin/python || python3 -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --quiet $(REF_TORCH)
	$(REF_VENV)/bin/pip install --quiet timm mobilesam-mirror segment-anything pycocotools pillow numpy
	touch $@

bench: install bench-env
	$(VENV)/bin/sam-batch bench --ref-venv $(REF_VENV) --write-doc

# Peak memory of the driver and every Ray worker over 100 and then 1,000 small images
# (sam_batch/bench_memory.py); about 10-20 minutes on 2 cores.
bench-memory: install
	$(VENV)/bin/sam-batch bench-memory --write-doc
