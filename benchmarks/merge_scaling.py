"""Seconds and peak memory of the seam merge (`tiles.merge_tiles`) on synthetic scenes of growing size.

A square scene is cut as `sam-batch` cuts it (`TILE_SIZE`, `OVERLAP`). Each tile holds about
`MASKS_PER_TILE` masks: objects only it sees, and, for `CROSSING_SHARE` of them, its views of
objects lying across its inner edges, which every tile they reach sees as well. Objects are
ellipses with box sides log-uniform over `SIDES_PX`, so the larger crossing ones are cut by
both tiles and stitched. Two tiles' views of one object differ: each is shifted and scaled by
up to `JITTER_PX` pixels, and `TAILED_SHARE` of them carry a thin tail that stretches the box
far more than the pixels (copies that only mask IoU finds to be one object).

Each scene runs in a fresh process, which reports its peak RSS (`ru_maxrss`) growth over the
RSS it had before building the scene, with the masks held and after the merge, and the merge's
wall and CPU seconds. `--before COMMIT` runs that commit's `pipeline/tiles.py` instead (read
with `git show`; its masks held as bool boxes, as it held them).

    .venv/bin/python benchmarks/merge_scaling.py [SIZE ...] [--rounds N] [--before COMMIT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from sam_batch.pipeline.tiles import SceneMask, Tile, is_cut, merge_tiles, plan_tiles

TILE_SIZE, OVERLAP = 1024, 128
MASKS_PER_TILE = 60
CROSSING_SHARE = 0.2  # of a tile's masks: views of objects across its inner edges
SIDES_PX = (16, 768)  # object box sides, log-uniform
JITTER_PX = 2  # two tiles' views of one object differ by up to this shift and change of radius
TAILED_SHARE = 0.25  # of the views of crossing objects: a 2 px tail 0.6 box sides long
IOU_THRESHOLD = 0.7  # amg.crop_nms_thresh's default
SIZES = (5000, 10000, 20000, 40000)
KIB = 1024  # ru_maxrss is in KiB on Linux


@dataclass(frozen=True)
class Ellipse:
    """An object: centre and radii in image pixels; tail: None or the side ('left', 'right',
    'up', 'down') a thin tail leaves it by."""

    cx: float
    cy: float
    rx: float
    ry: float
    tail: str | None = None


def synthetic_scene(
    size: int, seed: int = 0, masks_per_tile: int = MASKS_PER_TILE, crossing_share: float = CROSSING_SHARE
) -> tuple[list[SceneMask], list[Tile]]:
    """A size × size scene's masks, tile by tile (as `segment_scene` hands them to the merge), and its tiles.

    Across each inner edge of a tile lie `crossing_share * masks_per_tile / 4` objects, seen cut
    by that tile and by each neighbour they reach (whole where it sees them whole); a tile's
    other masks are objects only it sees.
    """
    rng = np.random.default_rng(seed)
    tiles = plan_tiles(size, size, TILE_SIZE, OVERLAP)
    columns = sorted({(t.window[0], t.window[2]) for t in tiles})
    rows = sorted({(t.window[1], t.window[3]) for t in tiles})
    seen: list[list[Ellipse]] = [[] for _ in tiles]
    per_edge = round(crossing_share * masks_per_tile / 4)  # an inner tile has 4 inner edges
    for r, (y0, y1) in enumerate(rows):
        for c, (x0, x1) in enumerate(columns):
            ox0, ox1 = _own_span(columns, c, size)
            oy0, oy1 = _own_span(rows, r, size)
            for _ in range(masks_per_tile - 2 * 4 * per_edge):  # its own, its edges', its neighbours' edges'
                seen[r * len(columns) + c].append(_object_inside(rng, ox0, oy0, ox1, oy1))
            for edge in (x for x in (x0, x1) if 0 < x < size):
                for _ in range(per_edge):
                    _share(rng, "x", edge, (oy0, oy1), columns, rows, seen)
            for edge in (y for y in (y0, y1) if 0 < y < size):
                for _ in range(per_edge):
                    _share(rng, "y", edge, (ox0, ox1), columns, rows, seen)
    masks = []
    for index, (tile, objects) in enumerate(zip(tiles, seen)):
        for shape in objects:
            mask = _view_of(shape, tile, index, (size, size), rng)
            if mask is not None:
                masks.append(mask)
    return masks, tiles


def _own_span(spans: list[tuple[int, int]], i: int, size: int) -> tuple[int, int]:
    """The part of span i no neighbouring span shares."""
    return (spans[i - 1][1] if i else 0), (spans[i + 1][0] if i + 1 < len(spans) else size)


def _side(rng: np.random.Generator, largest: float) -> float:
    low, high = math.log(SIDES_PX[0]), math.log(min(SIDES_PX[1], largest))
    return math.exp(rng.uniform(low, max(low, high)))


def _object_inside(rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int) -> Ellipse:
    """An ellipse whose box lies inside the XYXY span (end exclusive)."""
    width, height = _side(rng, x1 - x0), _side(rng, y1 - y0)
    cx = rng.uniform(x0 + width / 2, x1 - width / 2)
    cy = rng.uniform(y0 + height / 2, y1 - height / 2)
    return Ellipse(cx, cy, width / 2, height / 2)


def _share(
    rng: np.random.Generator,
    axis: str,
    edge: int,
    along: tuple[int, int],
    columns: list[tuple[int, int]],
    rows: list[tuple[int, int]],
    seen: list[list[Ellipse]],
) -> None:
    """An object across the tile edge at `axis` = `edge`, centred within `along` on the other
    axis, seen by every tile it reaches."""
    rx, ry = _side(rng, math.inf) / 2, _side(rng, math.inf) / 2
    across = edge + rng.uniform(-0.8, 0.8) * (rx if axis == "x" else ry)
    lengthwise = rng.uniform(*along)
    shape = Ellipse(across, lengthwise, rx, ry) if axis == "x" else Ellipse(lengthwise, across, rx, ry)
    reach = 2 * JITTER_PX + 0.6 * 2 * max(rx, ry)  # jitter and the longest tail
    for r, (ty0, ty1) in enumerate(rows):
        for c, (tx0, tx1) in enumerate(columns):
            if (
                tx0 < shape.cx + rx + reach
                and shape.cx - rx - reach < tx1
                and ty0 < shape.cy + ry + reach
                and shape.cy - ry - reach < ty1
            ):
                tail = rng.choice(["left", "right", "up", "down"]) if rng.random() < TAILED_SHARE else None
                seen[r * len(columns) + c].append(Ellipse(shape.cx, shape.cy, rx, ry, tail))


def _view_of(
    shape: Ellipse, tile: Tile, index: int, image_hw: tuple[int, int], rng: np.random.Generator
) -> SceneMask | None:
    """The tile's mask of an object: jittered, clipped to its window, cropped to its box; None if empty."""
    cx, cy = shape.cx + rng.uniform(-JITTER_PX, JITTER_PX), shape.cy + rng.uniform(-JITTER_PX, JITTER_PX)
    rx, ry = shape.rx + rng.uniform(-JITTER_PX, JITTER_PX) / 2, shape.ry + rng.uniform(-JITTER_PX, JITTER_PX) / 2
    tail = 0.6 * 2 * max(rx, ry) if shape.tail else 0.0
    wx0, wy0, wx1, wy1 = tile.window
    x0 = max(wx0, math.floor(cx - rx - (tail if shape.tail == "left" else 0)))
    x1 = min(wx1, math.ceil(cx + rx + (tail if shape.tail == "right" else 0)))
    y0 = max(wy0, math.floor(cy - ry - (tail if shape.tail == "up" else 0)))
    y1 = min(wy1, math.ceil(cy + ry + (tail if shape.tail == "down" else 0)))
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - cx)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - cy)
    pixels = (xs / np.float32(rx)) ** 2 + (ys / np.float32(ry)) ** 2 <= 1
    if shape.tail in ("left", "right"):
        pixels |= (np.abs(ys) < 1) & ((xs <= 0) if shape.tail == "left" else (xs >= 0))
    elif shape.tail:
        pixels |= (np.abs(xs) < 1) & ((ys <= 0) if shape.tail == "up" else (ys >= 0))
    filled_rows, filled_columns = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if not filled_rows.size:
        return None
    top, bottom, left, right = filled_rows[0], filled_rows[-1] + 1, filled_columns[0], filled_columns[-1] + 1
    mask = SceneMask(
        pixels=pixels[top:bottom, left:right],
        x0=int(x0 + left),
        y0=int(y0 + top),
        iou=float(rng.uniform(0.88, 1.0)),
        stability=float(rng.uniform(0.95, 1.0)),
        point=[min(max(cx, wx0), wx1 - 1), min(max(cy, wy0), wy1 - 1)],
        crop_box=list(tile.window),
        tile=index,
    )
    mask.cut = is_cut(mask.box, tile.window, image_hw)
    return mask


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB


def _merge_of(commit: str | None):
    """`merge_tiles` and a converter of this code's masks to its own, for `commit` (None: this checkout's)."""
    if commit is None:
        return merge_tiles, lambda masks: masks
    source = subprocess.check_output(["git", "show", f"{commit}:pipeline/tiles.py"], text=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("tiles_before", file.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiles_before"] = module
    spec.loader.exec_module(module)
    os.unlink(file.name)

    def convert(masks: list[SceneMask]) -> list:
        return [
            module.SceneMask(m.pixels, m.x0, m.y0, m.iou, m.stability, m.point, m.crop_box, m.tile, m.cut)
            for m in masks
        ]

    return module.merge_tiles, convert


def measure(size: int, commit: str | None) -> dict:
    """One scene in this process: masks, tiles, seconds and peak RSS growth (MiB)."""
    merge, convert = _merge_of(commit)
    start_rss = _rss_mib()
    masks, tiles = synthetic_scene(size)
    masks = convert(masks)
    held_rss = _rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    merged = merge(masks, tiles, IOU_THRESHOLD)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "size": size,
        "tiles": len(tiles),
        "masks": len(masks),
        "cut": sum(m.cut for m in masks),
        "merged": len(merged),
        "held_mib": held_rss - start_rss,
        "peak_mib": _peak_mib() - start_rss,
        "merge_wall_s": wall,
        "merge_cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--before", metavar="COMMIT", help="run this commit's pipeline/tiles.py")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per size, sizes alternating")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.sizes[0], args.before)))
        return
    label = f"tiles.py of {args.before}" if args.before else "this checkout"
    print(f"merge_tiles, {label}; load average before: {os.getloadavg()[0]:.2f}\n")
    print(
        "| scene | round | tiles | masks | cut | merged | masks held, MiB | peak RSS growth, MiB "
        "| merge wall s | merge CPU s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fastest: dict[int, float] = {}
    for round_index in range(args.rounds):
        for size in args.sizes:
            command = [sys.executable, __file__, str(size), "--one"] + (
                ["--before", args.before] if args.before else []
            )
            row = json.loads(subprocess.check_output(command, text=True))
            fastest[size] = min(fastest.get(size, math.inf), row["merge_cpu_s"])
            print(
                f"| {size:,}² | {round_index} | {row['tiles']:,} | {row['masks']:,} | {row['cut']:,} "
                f"| {row['merged']:,} | {row['held_mib']:,.0f} | {row['peak_mib']:,.0f} "
                f"| {row['merge_wall_s']:.2f} | {row['merge_cpu_s']:.2f} |",
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    first = args.sizes[0]
    for size in args.sizes[1:]:
        print(
            f"- {first:,}² → {size:,}², fastest CPU s of {args.rounds}: {fastest[first]:.3f} → {fastest[size]:.3f}, "
            f"{fastest[size] / fastest[first]:.1f}× for {(size / first) ** 2:.0f}× the area"
        )


if __name__ == "__main__":
    main()
