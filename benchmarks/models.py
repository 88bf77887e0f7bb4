"""`python -m benchmarks.models`: seconds per image of sam-batch's generator against the official
one, for the models without a reference generator in `make bench`: HQ-SAM (`vit_h_hq`, against
`segment-anything-hq`) and SAM 2.1 (`sam2.1_hiera_t`, against `sam2`), side by side on the same
photos, weights and threads.

The official weights cannot be downloaded here, so both sides load one seeded random state dict
(timing does not depend on the values: every point is decoded and every mask upscaled either
way; the masks kept differ from a trained model's, so the filters' share of the time does). The
official side runs in `.venv-ref` (`benchmarks/official_generator_driver.py`, the model loaded
before timing); ours in this process, `build_engine` as `sam-batch run` builds it. Rounds
alternate the sides; each figure is the median over rounds of an image's `generate` seconds.
A ratio is NOT VALID when the 1-minute load exceeded the threads by more than `LOAD_MARGIN`.
Markdown on stdout; exit 3 when a ratio is NOT VALID.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.reference import BenchError, LoadSampler, load_is_valid, reference_python
from sam_batch.engines.backend import set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.engines.registry import is_sam2
from sam_batch.engines.sam import build_sam
from sam_batch.engines.sam2 import build_sam2
from sam_batch.jobs.job_sections import DEFAULT_PRED_IOU_THRESH
from sam_batch.pipeline.amg import generate_masks
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams

DRIVER = Path(__file__).with_name("official_generator_driver.py")
DEFAULT_MODELS = ("sam2.1_hiera_t", "vit_h_hq")
DEFAULT_IMAGES = ("dog.jpg", "groceries.jpg")
SEED = 0
NOT_VALID_EXIT = 3


def random_state(model_type: str, path: Path) -> None:
    """A seeded randomly initialised model of `model_type`'s state dict, saved at `path`."""
    torch.manual_seed(SEED)
    model = build_sam2(model_type) if is_sam2(model_type) else build_sam(model_type)
    torch.save(model.state_dict(), path)


def official_seconds(
    python: Path, model_type: str, state: Path, images: list[Path], points: int, threads: int
) -> list[float]:
    """The official generator's seconds per image, in `images` order, in one `.venv-ref` process."""
    command = [str(python), str(DRIVER), model_type, str(state), *map(str, images)]
    command += ["--points-per-side", str(points), "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{DRIVER.name} {model_type} failed: {proc.stderr.strip()[-2000:]}")
    return [json.loads(line)["seconds"] for line in proc.stdout.splitlines() if line.startswith("{")]


def our_seconds(engine, model_type: str, images: list[np.ndarray], points: int) -> list[float]:
    """sam-batch's `generate_masks` seconds per image (model loaded), at the official defaults
    of `model_type`'s generator but `points`."""
    params = AmgParams(
        points_per_side=points, pred_iou_thresh=DEFAULT_PRED_IOU_THRESH["sam2" if is_sam2(model_type) else "sam"]
    )
    seconds = []
    for image in images:
        started = time.perf_counter()
        generate_masks(engine, image, params)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--images", nargs="+", type=Path, help="photos (default: dog.jpg, groceries.jpg in ../shared)")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ref-venv", type=Path, default=Path(".venv-ref"))
    args = parser.parse_args(argv)
    images = args.images or [Path("..", "shared", "data", "images", name) for name in DEFAULT_IMAGES]
    try:
        python = reference_python(args.ref_venv)
    except BenchError as error:
        print(f"benchmarks.models: {error}", file=sys.stderr)
        return 1
    set_cpu_threads(args.threads)
    pixels = [load_image(str(path)) for path in images]
    sampler = LoadSampler()
    sampler.start()
    rows, valid_all = [], True
    with tempfile.TemporaryDirectory() as scratch:
        for model_type in args.models:
            state = Path(scratch) / f"{model_type}.pt"
            random_state(model_type, state)
            engine = build_engine(model_type, str(state), device="cpu")
            official, ours = [], []
            mark = sampler.sample()
            for _ in range(args.rounds):
                official.append(official_seconds(python, model_type, state, images, args.points_per_side, args.threads))
                ours.append(our_seconds(engine, model_type, pixels, args.points_per_side))
            valid = load_is_valid(sampler.max_since(mark), args.threads)
            valid_all &= valid
            for index, path in enumerate(images):
                theirs = statistics.median(r[index] for r in official)
                mine = statistics.median(r[index] for r in ours)
                ratio = f"{theirs / mine:.2f}×" if valid else f"{theirs / mine:.2f}× NOT VALID"
                rows.append(f"| {model_type} | {path.name} | {theirs:.1f} | {mine:.1f} | {ratio} |")
            del engine
    sampler.stop()
    print(
        f"{args.points_per_side}×{args.points_per_side} points, {args.threads} threads, {args.rounds} rounds, "
        f"max 1-minute load {max(sampler.readings):.2f}"
    )
    print("\n| model | image | official s | sam-batch s | official / sam-batch |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0 if valid_all else NOT_VALID_EXIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
