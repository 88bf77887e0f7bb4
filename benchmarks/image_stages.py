"""Where the time of one image goes: `python -m benchmarks.image_stages IMAGE [--threads N]`.

Runs `generate_masks` + `to_records` once on the image in this process and prints the wall
seconds of each stage (encoder, decoder, upsampling + stability filter, boxes, NMS, RLE), summed
over the image's crops and point batches. The stages are timed by wrapping the functions
`pipeline.amg` calls, so the generator itself is unchanged; every stage is reported, 0 where
the engine's path has none (the CPU path finds boxes with the windows, in
"upsample+stability"; a GPU's in "boxes"). Batches decoded at once on several
threads (`concurrent_batches`) add up their seconds, so with N threads the stages can sum to
up to N times `generate`'s wall seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

STAGES = {  # stage -> (object holder, attribute) wrapped; "engine" stands for the engine built
    "encode": ("engine", "encode"),
    "decode": ("engine", "decode"),
    "upsample+stability": ("amg", "_stable_masks"),
    "boxes": ("held_masks", "masks_to_boxes"),
    "nms": ("amg", "box_nms"),
    "rle": ("amg", "encode_rle"),
}


def profile_image(uri: str, *, model: str = "vit_t", threads: int | None = None, points_per_side: int = 32) -> dict:
    """Seconds per stage of one image on the CPU, plus `generate` (all of it) and the number of masks."""
    from sam_batch.engines.backend import keep_freed_memory, set_cpu_threads
    from sam_batch.engines.factory import build_engine
    from sam_batch.pipeline.images import load_image

    used = set_cpu_threads(threads)
    keep_freed_memory()
    engine = build_engine(model, device="cpu")
    image = load_image(uri)
    seconds, masks = stage_seconds(engine, image, points_per_side)
    return {
        "image": uri,
        "size": list(image.shape[:2]),
        "threads": used,
        "masks": masks,
        **{k: round(v, 2) for k, v in seconds.items()},
    }


def stage_seconds(
    engine, image: np.ndarray, points_per_side: int, synchronize: Callable[[], None] = lambda: None
) -> tuple[Counter[str], int]:
    """Seconds per stage (`STAGES`, and `generate` for the whole) of `generate_masks` +
    `to_records` with `engine` on `image` (H, W, 3) uint8, and the number of masks.

    `synchronize` runs where each stage starts and ends (on a GPU, `torch.cuda.synchronize`), so
    work queued by one stage is counted in it, not in the next.
    """
    from sam_batch.pipeline import amg, held_masks
    from sam_batch.pipeline.params import AmgParams

    seconds: Counter[str] = Counter(dict.fromkeys(STAGES, 0.0))
    holders = {"engine": engine, "amg": amg, "held_masks": held_masks}
    originals = {stage: getattr(holders[h], a) for stage, (h, a) in STAGES.items()}
    for stage, (holder, attribute) in STAGES.items():
        setattr(holders[holder], attribute, _timed(originals[stage], stage, seconds, synchronize))
    try:
        synchronize()
        start = time.perf_counter()
        records = amg.to_records(amg.generate_masks(engine, image, AmgParams(points_per_side=points_per_side)))
        seconds["generate"] = time.perf_counter() - start
    finally:
        for stage, (holder, attribute) in STAGES.items():
            setattr(holders[holder], attribute, originals[stage])
    return seconds, len(records)


def _timed(function: Callable, stage: str, seconds: Counter, synchronize: Callable[[], None]) -> Callable:
    def timed(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        try:
            result = function(*args, **kwargs)
            synchronize()
            return result
        finally:
            seconds[stage] += time.perf_counter() - start

    return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_stages", description=__doc__.splitlines()[0])
    parser.add_argument("image", help="image path or fsspec URL")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--points-per-side", type=int, default=32)
    args = parser.parse_args(argv)
    print(
        json.dumps(
            profile_image(args.image, model=args.model, threads=args.threads, points_per_side=args.points_per_side)
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
