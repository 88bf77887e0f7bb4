"""Scenes as units of tiles: a tile's masks handed on exactly, a scene made whole from its tiles
in any order, and bad scenes (a truncated tiled TIFF, a sparse one declaring 150,000² pixels)
as one error row each, on both executors, with the rest of their shard whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml

from sam_batch.jobs.job_sections import RasterSpec
from sam_batch.jobs.stages import open_image, read_tile
from sam_batch.pipeline.rasters import MAX_PIXELS_PER_FILE_BYTE
from sam_batch.pipeline.tile_masks import pack
from sam_batch.pipeline.tiles import SceneMask
from shared_data import IMAGES

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
SPARSE_SIDE = 150_000


def test_a_tiles_masks_unpack_to_what_was_packed() -> None:
    rng = np.random.default_rng(7)
    masks = []
    for i, (height, width) in enumerate([(1, 1), (3, 17), (64, 9), (40, 40)]):
        masks.append(
            SceneMask(
                pixels=rng.random((height, width)) < 0.5,
                x0=100 + i,
                y0=7 * i,
                iou=float(np.float32(rng.random())),
                stability=float(np.float32(rng.random())),
                point=[float(rng.random() * 500), 12.5],
                crop_box=[0, 0, 512, 512],
                tile=3,
                cut=bool(i % 2),
            )
        )
    packed = pack(masks, 3)
    assert packed.nbytes < sum(m.pixels.size for m in masks)  # bits, not bytes, per pixel
    again = packed.unpack()
    assert len(again) == len(masks)
    for want, got in zip(masks, again):
        assert np.array_equal(want.pixels, got.pixels) and want.pixels.shape == got.pixels.shape
        assert (got.x0, got.y0, got.iou, got.stability, got.point, got.crop_box, got.tile, got.cut) == (
            want.x0,
            want.y0,
            want.iou,
            want.stability,
            want.point,
            want.crop_box,
            want.tile,
            want.cut,
        )
    assert pack([], 0).unpack() == []


def sparse_tiff(path: Path) -> Path:
    """A BigTIFF declaring SPARSE_SIDE² RGB pixels with no tile written: a few hundred KB."""
    profile = {
        "driver": "GTiff",
        "width": SPARSE_SIDE,
        "height": SPARSE_SIDE,
        "count": 3,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": 1024,
        "blockysize": 1024,
        "sparse_ok": True,
        "bigtiff": "YES",
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile):
        pass
    return path


def truncated_tiff(path: Path) -> Path:
    """RGB.byte.tif as a tiled TIFF (128 px blocks, uncompressed) cut at 60% of its bytes: the
    header and some tiles read, the others fail."""
    with rasterio.open(IMAGES / "RGB.byte.tif") as src:
        profile = {
            **src.profile,
            "tiled": True,
            "blockxsize": 128,
            "blockysize": 128,
            "compress": "none",
            "interleave": "pixel",
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def test_a_sparse_scene_declaring_huge_dimensions_is_refused_at_opening(tmp_path) -> None:
    path = sparse_tiff(tmp_path / "sparse.tif")
    size = path.stat().st_size
    assert size * MAX_PIXELS_PER_FILE_BYTE < SPARSE_SIDE**2
    opened, photo = open_image(str(path), {}, RasterSpec(), 60)
    assert photo is None and opened.plan is None
    assert opened.error == (
        f"decode: header claims {SPARSE_SIDE}x{SPARSE_SIDE} pixels in a file of {size} bytes, "
        f"over {MAX_PIXELS_PER_FILE_BYTE} pixels a byte: a sparse or broken raster"
    )


def test_a_truncated_scene_opens_and_its_lost_tiles_fail_with_one_line(tmp_path) -> None:
    path = truncated_tiff(tmp_path / "cut.tif")
    raster = RasterSpec(tile_size=256, tile_overlap=32)
    opened, _ = open_image(str(path), {}, raster, 60)
    assert opened.error is None and opened.raster and len(opened.plan.tiles) == 16
    reads = [read_tile(str(path), {}, raster, opened.stretch, tile.window, 60) for tile in opened.plan.tiles]
    failed = [status.error for status, _, _ in reads if status.error]
    assert 0 < len(failed) < len(reads)
    assert all(e.startswith("decode: raster read failed: ") and "\n" not in e for e in failed)
    assert all(rgb is None and valid is None for status, rgb, valid in reads if status.error)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_bad_scenes_are_one_error_row_each_and_the_shard_commits(tmp_path, executor: str) -> None:
    uris = [
        str(truncated_tiff(tmp_path / "cut.tif")),
        str(IMAGES / "rgb1.tif"),
        str(sparse_tiff(tmp_path / "sparse.tif")),
    ]
    out = tmp_path / "out"
    job = {
        "name": "bad-scenes",
        "input": {"uris": uris},
        "output": {"uri": str(out)},
        "amg": {"points_per_side": 4},
        "raster": {"tile_size": 256, "tile_overlap": 32},
        "run": {"executor": executor, "shard_size": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([SAM_BATCH, "run", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    images = {Path(r["image_uri"]).name: r for r in pq.read_table(out / "images").to_pylist()}
    assert images["rgb1.tif"]["status"] == "ok" and images["rgb1.tif"]["n_masks"] > 0
    assert images["cut.tif"]["status"] == "error" and images["cut.tif"]["error"].startswith(
        "decode: raster read failed"
    )
    assert (images["cut.tif"]["width"], images["cut.tif"]["height"]) == (791, 718)
    assert images["sparse.tif"]["error"].endswith("a sparse or broken raster")
    masks = pq.read_table(out / "masks").to_pylist()
    assert {r["image_uri"] for r in masks} == {str(IMAGES / "rgb1.tif")}
    record = json.loads((out / "run.json").read_text())
    assert (record["executor"], record["images_ok"], record["images_error"]) == (executor, 1, 2)
