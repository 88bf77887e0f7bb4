"""Peak memory and seconds of one photo segmented whole, in process, at a chosen size.

The photo is resized (bicubic) so its width is WIDTH, then `generate_masks` + `to_records` run
on it with the default parameters (32 x 32 points) on the CPU with 2 torch threads: what a
segmenting worker does for a photo that `raster.tiling: auto` leaves whole.

    .venv/bin/python benchmarks/whole_photo_memory.py IMAGE WIDTH
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
from PIL import Image

from sam_batch.engines.backend import keep_freed_memory, set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams

MIB = 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    path, width = sys.argv[1], int(sys.argv[2])
    set_cpu_threads(2)
    keep_freed_memory()
    image = load_image(path)
    height = round(image.shape[0] * width / image.shape[1])
    image = np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    engine = build_engine("vit_t", device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    started = time.perf_counter()
    records = to_records(generate_masks(engine, image, AmgParams()))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    print(
        f"{path} at {width}x{height} ({width * height / 1e6:.1f} MP): {len(records)} masks, "
        f"{seconds:.1f} s, peak RSS {peak:.0f} MiB ({before:.0f} MiB before segmenting)"
    )


if __name__ == "__main__":
    main()
