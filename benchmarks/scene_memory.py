"""`python -m benchmarks.scene_memory`: peak memory of tiled scene segmentation as scenes grow.

Mosaics a GeoTIFF n x n times (n = 1, 2, 4: 1x, 4x and 16x the pixels) into tiled GeoTIFFs
with the source's nodata and a matching transform, then segments each in a fresh process
(`pipeline.scenes.segment_scene` on a `RasterScene`, the path `sam-batch run` takes for
rasters) and reports the process's peak RSS, the tiles, the masks and the seconds. Windowed
reading keeps pixel memory at one tile, so peak RSS should stay flat while the scene grows;
what grows is the masks held until the scene's seams are merged (the pixels of each mask's box).
With `--write-doc` the table is appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SCENE = "../shared/data/images/RGB.byte.tif"


def mosaic(source: Path, factor: int, out: Path) -> Path:
    """`source` repeated factor x factor times as one tiled GeoTIFF (same pixel size and CRS)."""
    import rasterio

    with rasterio.open(source) as src:
        profile, pixels = src.profile, src.read()
    profile.update(
        width=src.width * factor,
        height=src.height * factor,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    )
    with rasterio.open(out, "w", **profile) as dst:
        for row in range(factor):
            for column in range(factor):
                window = rasterio.windows.Window(column * src.width, row * src.height, src.width, src.height)
                dst.write(pixels, window=window)
    return out


def measure_one(path: str, points_per_side: int, tile_size: int, overlap: int) -> dict:
    """Segment one scene in this process; its figures, peak RSS in MiB."""
    from sam_batch.engines.backend import keep_freed_memory, set_cpu_threads
    from sam_batch.engines.factory import build_engine
    from sam_batch.pipeline.params import AmgParams
    from sam_batch.pipeline.rasters import RasterScene
    from sam_batch.pipeline.scenes import segment_scene

    set_cpu_threads()
    keep_freed_memory()  # as a segmenting worker does
    engine = build_engine("vit_t", None, None)
    started = time.perf_counter()
    with RasterScene(path) as scene:
        result = segment_scene(engine, scene, AmgParams(points_per_side=points_per_side), tile_size, overlap)
        rows = result.records()
    return {
        "width": result.width,
        "height": result.height,
        "tiles": result.tiles,
        "tiles_skipped": result.tiles_skipped,
        "masks": len(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scene_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--scene", default=DEFAULT_SCENE, help="source GeoTIFF to mosaic")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="mosaic n x n for each n")
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--tile-overlap", type=int, default=128)
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this scene and print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.points_per_side, args.tile_size, args.tile_overlap)))
        return 0
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for factor in args.factors:
            path = mosaic(Path(args.scene), factor, Path(tmp) / f"mosaic{factor}.tif")
            command = [
                sys.executable,
                "-m",
                "benchmarks.scene_memory",
                "--one",
                str(path),
                "--points-per-side",
                str(args.points_per_side),
                "--tile-size",
                str(args.tile_size),
                "--tile-overlap",
                str(args.tile_overlap),
            ]
            figures = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append({"pixels": f"{factor * factor}x", **figures})
            print(rows[-1], flush=True)
    table = _markdown(rows)
    print(table)
    if args.write_doc:
        _append_doc(Path(args.doc), args, table, load_before, os.getloadavg()[0])
    return 0


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| scene | size | tiles (skipped) | masks | seconds | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pixels']} | {r['width']}×{r['height']} | {r['tiles']} ({r['tiles_skipped']}) | {r['masks']} "
            f"| {r['seconds']} | {r['peak_rss_mib']} |"
        )
    return "\n".join(lines)


def _append_doc(doc: Path, args: argparse.Namespace, table: str, load_before: float, load_after: float) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"""
## {now} — scene memory, vit_t, {args.points_per_side}×{args.points_per_side} points per tile

- machine: {os.cpu_count()} cores (`nproc`), {platform.processor() or platform.machine()}
- command: `python -m benchmarks.scene_memory --scene {args.scene} --factors {" ".join(map(str, args.factors))} \
--points-per-side {args.points_per_side} --tile-size {args.tile_size} --tile-overlap {args.tile_overlap} --write-doc`
- scenes: {args.scene} mosaicked n×n (tiled GeoTIFF, deflate), each segmented in a fresh process; \
peak RSS is that process's (`ru_maxrss`), model included
- load (1-min average) before / after: {load_before:.2f} / {load_after:.2f}

{table}
"""
    with doc.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    raise SystemExit(main())
