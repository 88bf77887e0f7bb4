# sam-batch: make install | demo | lint | test | bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch from this machine's disk; an unpinned torch would pull a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo lint test test-unit test-fast test-reference bench bench-env bench-models bench-prompts bench-memory bench-export bench-pipeline bench-overhead gpu-kit

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e '.[test,demo,s3,onnx,lint]'
	touch $@

demo: install
	$(PY) -m sam_batch.demo

# ruff's lint and format check, with the rules in pyproject.toml ([tool.ruff]); CI runs it first
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(VENV)/bin/pytest -q

# tests/unit only: needs nothing outside the checkout, under 2 minutes
test-unit: install
	$(VENV)/bin/pytest -q tests/unit

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

# The reference generator (MobileSAM's SamAutomaticMaskGenerator) in its own environment,
# never in $(VENV): `make bench` runs it and sam-batch side by side (benchmarks/reference.py).
REF_VENV ?= .venv-ref
REF_TORCH ?= torch==2.14.1 torchvision==0.29.1

bench-env: $(REF_VENV)/.installed

$(REF_VENV)/.installed:
	test -x $(REF_VENV)/bin/python || python3 -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --quiet $(REF_TORCH)
	$(REF_VENV)/bin/pip install --quiet timm mobilesam-mirror segment-anything pycocotools pillow numpy opencv-python-headless
	$(REF_VENV)/bin/pip install --quiet $(REF_MODELS)
	touch $@

# The official code of the other model families, in $(REF_VENV) only (sam2 needs hydra; its CUDA
# extension is not built); `test-reference` adds them to an environment made before they were listed.
REF_MODELS ?= segment-anything-hq==0.3 sam2==1.1.0
export SAM2_BUILD_CUDA = 0

# Parity with official model code that runs only in $(REF_VENV) (HQ-SAM's segment-anything-hq,
# SAM 2.1's sam2): tests/integration/test_{hq,sam2}_parity.py, which `make test` skips, saying
# why, where they are missing. About 15 minutes on 2 cores.
test-reference: install bench-env
	$(REF_VENV)/bin/python -c "import segment_anything_hq, sam2" 2>/dev/null || $(REF_VENV)/bin/pip install --quiet $(REF_MODELS)
	$(VENV)/bin/pytest -q tests/integration/test_hq_parity.py tests/integration/test_sam2_parity.py

# sam-batch's generator against the official ones for HQ-SAM (vit_h_hq) and SAM 2.1
# (sam2.1_hiera_t) on seeded random weights, side by side (benchmarks/models.py); Markdown on
# stdout, exit 3 when NOT VALID.
bench-models: install bench-env
	$(REF_VENV)/bin/python -c "import segment_anything_hq, sam2" 2>/dev/null || $(REF_VENV)/bin/pip install --quiet $(REF_MODELS)
	$(PY) -m benchmarks.models

# The generator side by side (benchmarks.reference), then the prompts row (bench-prompts, below),
# then the HQ-SAM and SAM 2.1 rows (bench-models, above; Markdown on stdout). Fails with the first
# failing part's status (3: a ratio NOT VALID, the load above the threads, or for the generator a
# side drifted over 15% from its quiet baseline); every part still runs and reports.
bench: install bench-env
	$(REF_VENV)/bin/python -c "import segment_anything_hq, sam2" 2>/dev/null || $(REF_VENV)/bin/pip install --quiet $(REF_MODELS)
	$(VENV)/bin/python -m benchmarks.reference --ref-venv $(REF_VENV) --write-doc; generator=$$?; \
	$(VENV)/bin/python -m benchmarks.prompts --ref-venv $(REF_VENV) --write-doc $(PROMPTS_ARGS); prompts=$$?; \
	$(VENV)/bin/python -m benchmarks.models --ref-venv $(REF_VENV); models=$$?; \
	exit $$(( generator ? generator : prompts ? prompts : models ))

# prompts/s of prompt jobs against the reference SamPredictor looping over the same boxes: 1,000 on
# one image, 10 on each of 100 images (the photos cycled), in process and through `sam-batch run`
# (benchmarks/prompts.py; sizes: --boxes, --n-images, --per-image through PROMPTS_ARGS). Exit 3
# when a case is NOT VALID (load above the threads); the doc section is still written.
PROMPTS_ARGS ?=
bench-prompts: install bench-env
	$(VENV)/bin/python -m benchmarks.prompts --ref-venv $(REF_VENV) --write-doc $(PROMPTS_ARGS)

# What `sam-batch run` costs beyond the model: a run over one 64x64 image start to exit (in process
# and on Ray), and one photo's segment seconds in process against in a Ray actor
# (benchmarks/run_overhead.py); Markdown on stdout, exit 3 when NOT VALID.
bench-overhead: install
	$(VENV)/bin/python -m benchmarks.run_overhead

# Peak memory of the driver and every Ray worker over 100 and then 1,000 small images
# (benchmarks/ray_memory.py); about 10-20 minutes on 2 cores.
bench-memory: install
	$(VENV)/bin/python -m benchmarks.ray_memory --write-doc

# Peak memory and time of `sam-batch export` as the output grows (benchmarks/export_memory.py).
bench-export: install
	$(PY) -m benchmarks.export_memory

# The Ray pipeline without a GPU (benchmarks/pipeline.py): a stand-in engine (200 ms a tile), a
# store with 100 ms a range request, 1, 2 and 4 actors, and the driver's peak RSS; Markdown on stdout.
bench-pipeline: install
	$(PY) benchmarks/pipeline.py

# What a GPU machine lent through the device tool needs beside the checkout, packed into
# $(KIT) (carry it; run deploy/gpu-check.sh there, see docs/benchmarks.md): the vit_t weights
# (fetched by `sam-batch weights fetch`, or copied from WEIGHTS_FROM and verified), the photos and
# golden files, and wheels for what that machine's Python $(KIT_PYTHON) lacks (pycocotools, and
# MobileSAM's generator for the reference phase).
KIT ?= .gpu-kit
KIT_PYTHON ?= 3.12
WEIGHTS_FROM ?=
SHARED ?= ../shared

gpu-kit: install
	rm -rf $(KIT) && mkdir -p $(KIT)/weights $(KIT)/images $(KIT)/golden $(KIT)/wheels
	test -z "$(WEIGHTS_FROM)" || cp "$(WEIGHTS_FROM)" $(KIT)/weights/mobile_sam.pt
	SAM_BATCH_CACHE=$(abspath $(KIT))/weights $(VENV)/bin/sam-batch weights fetch vit_t
	cp $(SHARED)/data/images/*.jpg $(KIT)/images/
	cp $(SHARED)/golden/*.json $(KIT)/golden/
	cp -r $(SHARED)/golden/prompts $(KIT)/golden/
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version $(KIT_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(KIT)/wheels pycocotools==2.0.11 mobilesam-mirror==1.0.0
	du -sh $(KIT)
