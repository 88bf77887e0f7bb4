"""What the masks table's mask columns cost, on this machine.

    python -m benchmarks.mask_decode decode [--sides 1024 4096 8192] [--mask-side 50]
    python -m benchmarks.mask_decode reproject [--masks 1000 10000]

`decode`: pycocotools' decode of one small square mask from its full-image RLE and from its
box-local RLE, at several image sizes, each size in a fresh process so that its peak RSS is its
own: seconds and peak RSS growth (MiB). `reproject`: `tables.masks_table` over N disc-shaped
masks of the Landsat test scene (EPSG:32618), written in the scene's CRS and reprojected to
EPSG:4326, 2 rounds. Each prints Markdown table rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SIDES = (1024, 2048, 4096, 8192, 16384)
DEFAULT_MASK_SIDE = 50  # pixels: a small object, as the 50 x 50 mask
DEFAULT_MASK_COUNTS = (1000, 10000)
LANDSAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "RGB.byte.tif"
DISC_BOX = 60  # pixels: each reprojected mask is a disc of radius 8 to 29 in a box this wide


def measure_decode(side: int, mask_side: int) -> dict:
    """Decode seconds and peak RSS growth (MiB) of a square mask of `mask_side` at the centre of
    a `side` x `side` image, from its full-image RLE and from its box-local RLE."""
    from pycocotools import mask as coco_mask

    from sam_batch.pipeline.rle import encode_rle, encode_rle_placed

    pixels = np.ones((mask_side, mask_side), dtype=bool)
    origin = (side - mask_side) // 2
    full = encode_rle_placed(pixels, origin, origin, (side, side))
    box = encode_rle(pixels)
    result = {"side": side}
    for name, rle in (("box", box), ("full", full)):  # the box first: it must not see the full one's peak
        before = _peak_rss_mib()
        started = time.perf_counter()
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        result[f"{name}_seconds"] = time.perf_counter() - started
        result[f"{name}_mib"] = _peak_rss_mib() - before
        assert int(decoded.sum()) == mask_side * mask_side
        del decoded
    return result


def measure_reprojection(n_masks: int) -> list[str]:
    """Seconds of `masks_table` over `n_masks` masks of the Landsat scene, in its CRS and in
    EPSG:4326, 2 rounds: Markdown rows."""
    import rasterio

    from sam_batch.pipeline.geometry import mask_geometry
    from sam_batch.pipeline.rle import mask_rle_columns
    from sam_batch.pipeline.tables import image_row, mask_rows, masks_table

    with rasterio.open(LANDSAT) as src:
        transform, crs, image_hw = src.transform, f"EPSG:{src.crs.to_epsg()}", (src.height, src.width)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:DISC_BOX, :DISC_BOX]
    records = []
    for _ in range(n_masks):
        radius = rng.uniform(8, DISC_BOX / 2 - 1)
        pixels = (xx - DISC_BOX / 2) ** 2 + (yy - DISC_BOX / 2) ** 2 < radius**2
        x0, y0 = int(rng.integers(0, image_hw[1] - DISC_BOX)), int(rng.integers(0, image_hw[0] - DISC_BOX))
        geometry, bounds = mask_geometry(pixels, x0, y0, transform)
        records.append(
            {
                **mask_rle_columns(pixels, x0, y0, image_hw),
                "area": int(pixels.sum()),
                "bbox": [0.0] * 4,
                "predicted_iou": 1.0,
                "point_coords": [[0.0, 0.0]],
                "stability_score": 1.0,
                "crop_box": [0, 0, 1, 1],
                "geometry": geometry,
                "geometry_bbox": bounds,
            }
        )
    rows = mask_rows(str(LANDSAT), records)
    images = [
        image_row(
            str(LANDSAT),
            status="ok",
            error=None,
            width=image_hw[1],
            height=image_hw[0],
            n_masks=n_masks,
            seconds=0.0,
            crs=crs,
        )
    ]
    vertices = sum((len(row["geometry"]) - 9) // 16 for row in rows)  # about: 16 bytes a vertex
    lines = []
    for round_ in range(2):
        seconds = {}
        for target in (crs, "EPSG:4326"):
            started = time.perf_counter()
            masks_table(rows, images, target)
            seconds[target] = time.perf_counter() - started
        lines.append(f"| {n_masks} | ~{vertices} | {round_} | {seconds[crs]:.3f} | {seconds['EPSG:4326']:.3f} |")
    return lines


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mask_decode", description=__doc__)
    what = parser.add_subparsers(dest="what", required=True)
    decode = what.add_parser("decode")
    decode.add_argument("--sides", type=int, nargs="+", default=list(DEFAULT_SIDES))
    decode.add_argument("--mask-side", type=int, default=DEFAULT_MASK_SIDE)
    decode.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure one side
    reproject = what.add_parser("reproject")
    reproject.add_argument("--masks", type=int, nargs="+", default=list(DEFAULT_MASK_COUNTS))
    args = parser.parse_args(argv)
    if args.what == "reproject":
        print("| masks | vertices | round | masks_table, scene's CRS: s | to EPSG:4326: s |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n_masks in args.masks:
            print("\n".join(measure_reprojection(n_masks)), flush=True)
        return 0
    if args.one is not None:
        print(json.dumps(measure_decode(args.one, args.mask_side)))
        return 0
    print("| image | full-image RLE: s | MiB | box-local RLE: s | MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side in args.sides:
        child = [
            sys.executable,
            "-m",
            "benchmarks.mask_decode",
            "decode",
            "--one",
            str(side),
            "--mask-side",
            str(args.mask_side),
        ]
        row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(
            f"| {side}² | {row['full_seconds']:.4f} | {row['full_mib']:.0f} | "
            f"{row['box_seconds']:.6f} | {row['box_mib']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
