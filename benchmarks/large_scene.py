"""A real run over a large scene: RGB.byte.tif (the Landsat test scene, 791 x 718) upsampled to
8192 x 8192 and segmented by vit_t on the CPU at 8 x 8 points a tile (tile 1024, overlap 128:
81 tiles), on Ray with two actors; then the same job again (it must resume with nothing
redone), then on one actor (its masks must equal the two actors'). The one-actor run is held to
one core (`os.sched_setaffinity`, which the embedded Ray sizes its CPUs by), so that its actor,
like each of the two, runs torch on one thread: float sums in the same order, the same logits.

    .venv/bin/python benchmarks/large_scene.py [WORKDIR]

Prints one JSON object: seconds and run records of the three runs, and whether the masks agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import rasterio
import yaml
from rasterio.enums import Resampling

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCENE = SHARED / "data" / "images" / "RGB.byte.tif"
SIDE = 8192
SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")


def upsampled_scene(path: Path) -> Path:
    """SCENE resampled (bilinear) to SIDE x SIDE, georeferenced alike, as a tiled deflate GeoTIFF."""
    with rasterio.open(SCENE) as src:
        pixels = src.read(out_shape=(src.count, SIDE, SIDE), resampling=Resampling.bilinear)
        transform = src.transform * src.transform.scale(src.width / SIDE, src.height / SIDE)
        profile = {
            **src.profile,
            "width": SIDE,
            "height": SIDE,
            "transform": transform,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def run(folder: Path, scene: Path, out: Path, max_actors: int, one_core: bool = False) -> tuple[float, dict]:
    """`sam-batch run` of the scene on Ray with `max_actors` actors, on one core of this process's
    if `one_core`: (seconds, run.json)."""
    job = {
        "name": "large-scene",
        "input": {"uris": [str(scene)]},
        "output": {"uri": str(out)},
        "model": {"type": "vit_t"},
        "amg": {"points_per_side": 8},
        "raster": {"tile_size": 1024, "tile_overlap": 128},
        "run": {"executor": "ray", "max_actors": max_actors},
    }
    path = folder / f"job-{out.name}.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    core = min(os.sched_getaffinity(0))
    subprocess.run(
        [SAM_BATCH, "run", str(path)],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if one_core else None,
    )
    return time.perf_counter() - started, json.loads((out / "run.json").read_text())


def masks(out: Path) -> list[tuple]:
    table = pq.read_table(out / "masks", columns=["mask_id", "bbox", "area", "geometry"]).to_pylist()
    return sorted((r["mask_id"], tuple(r["bbox"]), r["area"], r["geometry"]) for r in table)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="large-scene-"))
    scene = upsampled_scene(folder / "landsat-8192.tif")
    two_s, two = run(folder, scene, folder / "two", 2)
    again_s, again = run(folder, scene, folder / "two", 2)
    one_s, one = run(folder, scene, folder / "one", 1, one_core=True)
    print(
        json.dumps(
            {
                "scene": f"{SIDE}x{SIDE}",
                "two_actors": {"seconds": round(two_s, 1), "run": two},
                "resumed": {"seconds": round(again_s, 1), "run": again},
                "one_actor": {"seconds": round(one_s, 1), "run": one},
                "masks_equal": masks(folder / "two") == masks(folder / "one"),
                "n_masks": two["masks"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
