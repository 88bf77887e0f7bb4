#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("Measuring on a GPU"), as one time-boxed command
# on a machine lent through the device tool. Here:
#   make gpu-kit WEIGHTS_FROM=../shared/models/mobile_sam.pt
# then, through the tool:
#   run(command="bash deploy/gpu-check.sh", carry=[".gpu-kit"], timeout_s=560)
# There, from the checkout's root and with no network: installs the kit's wheels and this
# checkout into $SITE, then runs `python -m benchmarks.gpu_check` on the kit's photos, writing
# results.jsonl, report.md, log.txt and nvidia-smi.csv into $OUT. Extra arguments go to
# benchmarks.gpu_check (`--help` lists them); BUDGET_S is the time after which no phase starts.
set -euo pipefail
kit=$(cd "${KIT:-.gpu-kit}" && pwd)
out=${OUT:-/tmp/gpu-check}
site=${SITE:-/tmp/site}
python=${PYTHON:-python3}
mkdir -p "$out" "$site/sam_batch"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$kit"/wheels/*.whl
# the package as pyproject.toml maps it: sam_batch/ with engines/, pipeline/ and jobs/ inside;
# beside it the checkout's benchmarks/, which the wheel leaves out
cp -r sam_batch/. "$site/sam_batch/" && cp -r engines pipeline jobs "$site/sam_batch/" && cp -r benchmarks "$site/"
# the tests' seeded HQ-SAM and SAM 2.1 weights (`MODEL:seeded`), made there from the kit's vit_t
cp tests/reference_cases.py tests/seeded_checkpoints.py "$site/"
# PYTHONSAFEPATH: the checkout itself (its sam_batch/ holds no engines/) must not shadow $site
export PYTHONPATH="$site" PYTHONSAFEPATH=1 SAM_BATCH_CACHE="$kit/weights" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
"$python" -m benchmarks.gpu_check --images "$kit"/images/*.jpg --golden "$kit/golden" --out "$out" \
    --models vit_t vit_h:random vit_t_hq:seeded sam2.1_hiera_t:seeded --reference --profile fp16 --compile fp16 --prompts "$kit/golden/prompts" \
    --budget-s "${BUDGET_S:-360}" "$@" 2>&1 | tee "$out/log.txt"
