"""`python -m benchmarks.export_memory`: peak memory and time of `sam-batch export` as the output grows.

The benchmark builds synthetic committed outputs (`synthetic_output`: georeferenced 1024x1024
"scenes" in EPSG:32618, each with the same pool of masks — discs of 4-24 px radius at seeded
random places, their RLE, box and polygon made by the pipeline's own functions — committed
shard by shard through `OutputDataset.commit_shard`), then runs `sam-batch export` on each as
a separate process per format and reads the process's peak RSS from the kernel (`wait4`). A
peak that stays flat while the masks grow tenfold means the export does not hold them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from rasterio.transform import Affine

from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.plan import Plan, Shard
from sam_batch.pipeline.geometry import mask_geometry
from sam_batch.pipeline.rle import encode_rle_placed
from sam_batch.pipeline.tables import image_id_for, image_row, images_table, mask_rows, masks_table

SCENE_SIZE = 1024  # pixels a side of each synthetic scene
SCENE_CRS = "EPSG:32618"
SCENE_TRANSFORM = Affine(30.0, 0.0, 300000.0, 0.0, -30.0, 4500000.0)  # 30 m pixels in UTM 18N
DISC_RADII = (4, 24)  # pixels, the smallest and largest synthetic mask
DEFAULT_MASKS = (100_000, 1_000_000)
DEFAULT_FORMATS = ("coco", "gpkg", "fgb", "geoparquet")
SUFFIXES = {"coco": ".json", "gpkg": ".gpkg", "fgb": ".fgb", "geoparquet": ".parquet", "geojsonseq": ".geojsonl"}
MIB = 2**20


def mask_pool(n_masks: int, seed: int = 0) -> list[dict]:
    """`n_masks` records of one synthetic scene: discs, as the pipeline's records hold them."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n_masks):
        radius = int(rng.integers(*DISC_RADII))
        x0, y0 = (int(v) for v in rng.integers(0, SCENE_SIZE - 2 * radius - 1, size=2))
        yy, xx = np.mgrid[: 2 * radius + 1, : 2 * radius + 1]
        pixels = (yy - radius) ** 2 + (xx - radius) ** 2 <= radius**2
        wkb, bounds = mask_geometry(pixels, x0, y0, SCENE_TRANSFORM)
        records.append(
            {
                "segmentation": encode_rle_placed(pixels, x0, y0, (SCENE_SIZE, SCENE_SIZE)),
                "bbox": [float(x0), float(y0), float(2 * radius), float(2 * radius)],
                "area": int(pixels.sum()),
                "predicted_iou": float(rng.uniform(0.88, 1.0)),
                "stability_score": float(rng.uniform(0.95, 1.0)),
                "point_coords": [[float(x0 + radius), float(y0 + radius)]],
                "crop_box": [0, 0, SCENE_SIZE, SCENE_SIZE],
                "geometry": wkb,
                "geometry_bbox": bounds,
            }
        )
    return records


def synthetic_output(root: Path, n_images: int, masks_per_image: int, images_per_shard: int) -> Path:
    """A committed output of `n_images` synthetic scenes of `masks_per_image` masks each."""
    uris = [f"synthetic://scene-{i:06d}.tif" for i in range(n_images)]
    shards = tuple(
        Shard(i, tuple(uris[s : s + images_per_shard])) for i, s in enumerate(range(0, n_images, images_per_shard))
    )
    dataset = OutputDataset(str(root))
    dataset.write_plan(Plan("synthetic", {"name": "bench-export"}, shards))
    template_images = [
        image_row(
            uris[0],
            status="ok",
            error=None,
            width=SCENE_SIZE,
            height=SCENE_SIZE,
            n_masks=masks_per_image,
            seconds=0.0,
            crs=SCENE_CRS,
            transform=list(SCENE_TRANSFORM)[:6],
        )
    ]
    template = masks_table(mask_rows(uris[0], mask_pool(masks_per_image)), template_images, SCENE_CRS)
    for shard in shards:
        masks = pa.concat_tables([_for_image(template, uri) for uri in shard.uris])
        images = images_table(
            [{**template_images[0], "image_uri": uri, "image_id": image_id_for(uri)} for uri in shard.uris]
        )
        dataset.commit_shard(shard, masks, images, {"images": len(shard.uris)})
    return root


def _for_image(template: pa.Table, uri: str) -> pa.Table:
    """The template scene's masks as another image's."""
    n = template.num_rows
    table = template.set_column(0, "image_uri", pa.array([uri] * n, pa.string()))
    return table.set_column(1, "image_id", pa.array([image_id_for(uri)] * n, pa.string()))


@dataclass
class Measurement:
    masks: int
    format: str
    peak_rss: int  # bytes
    seconds: float
    file_bytes: int


def measure_export(output: Path, destination: Path, format_: str) -> tuple[int, float]:
    """Run `sam-batch export` as its own process: (its peak RSS in bytes, wall seconds)."""
    command = [
        str(Path(sys.executable).parent / "sam-batch"),
        "export",
        str(output),
        "--to",
        str(destination),
        "--format",
        format_,
    ]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{shlex.join(command)} failed: {log.read().decode(errors='replace').strip()}")
    return usage.ru_maxrss * 1024, seconds


def run(
    work: Path, mask_counts: list[int], formats: list[str], masks_per_image: int, images_per_shard: int
) -> list[Measurement]:
    results = []
    for total in mask_counts:
        output = synthetic_output(work / f"out-{total}", total // masks_per_image, masks_per_image, images_per_shard)
        for format_ in formats:
            destination = work / f"export-{total}{SUFFIXES[format_]}"
            peak, seconds = measure_export(output, destination, format_)
            results.append(Measurement(total, format_, peak, seconds, destination.stat().st_size))
            destination.unlink()
            print(f"{total} masks, {format_}: peak RSS {peak / MIB:.0f} MiB, {seconds:.1f} s", file=sys.stderr)
    return results


def format_report(results: list[Measurement]) -> str:
    lines = [
        "| masks | format | peak RSS (MiB) | seconds | masks/s | file (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        lines.append(
            f"| {m.masks:,} | {m.format} | {m.peak_rss / MIB:.0f} | {m.seconds:.1f} | "
            f"{m.masks / m.seconds:,.0f} | {m.file_bytes / MIB:.0f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--masks", type=int, nargs="+", default=list(DEFAULT_MASKS), help="total masks of each synthetic output"
    )
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS), choices=sorted(SUFFIXES))
    parser.add_argument("--masks-per-image", type=int, default=1000)
    parser.add_argument("--images-per-shard", type=int, default=64)
    parser.add_argument("--work", help="folder for the outputs and exports (default: a temporary one)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[:2]
    with tempfile.TemporaryDirectory(prefix="sam-batch-bench-export-", dir=args.work) as work:
        results = run(Path(work), args.masks, args.formats, args.masks_per_image, args.images_per_shard)
    end_load = os.getloadavg()[:2]
    print(
        f"{started}, load average (1, 5 min) {load[0]:.1f}, {load[1]:.1f} at start, "
        f"{end_load[0]:.1f}, {end_load[1]:.1f} at the end; {os.cpu_count()} CPUs"
    )
    print(f"command: python -m benchmarks.export_memory {shlex.join(argv)}")
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
