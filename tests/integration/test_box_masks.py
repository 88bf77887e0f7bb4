"""Box-local masks: `box_segmentation` + `box_origin` beside `segmentation`, which is null for
images over `rle.MAX_FULL_RLE_PIXELS`; render and DuckDB read either."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from sam_batch.cli import main as cli_main
from sam_batch.engines.factory import build_engine
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.runner import run_job
from sam_batch.pipeline import rle
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rasters import ArrayScene
from sam_batch.pipeline.render import box_mask, overlay
from sam_batch.pipeline.scenes import segment_scene
from shared_data import IMAGES

LANDSAT = IMAGES / "RGB.byte.tif"  # 791 x 718 = 567,938 pixels
DOG = IMAGES / "dog.jpg"  # 800 x 534 = 427,200 pixels
BETWEEN_THEM = 500_000  # a threshold that keeps dog.jpg's full-image RLE and drops the scene's


def _coco(encoded: dict) -> dict:
    return {"size": encoded["size"], "counts": encoded["counts"].encode()}


def test_both_encodings_round_trip_the_mask_pixels() -> None:
    rng = np.random.default_rng(7)
    image_hw = (300, 410)
    for _ in range(50):
        h, w = rng.integers(1, 120, size=2)
        x0, y0 = rng.integers(0, image_hw[1] - w + 1), rng.integers(0, image_hw[0] - h + 1)
        pixels = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        full = np.zeros(image_hw, dtype=bool)
        full[y0 : y0 + h, x0 : x0 + w] = pixels
        columns = rle.mask_rle_columns(pixels, x0, y0, image_hw)
        assert columns["box_origin"] == [x0, y0]
        assert columns["box_segmentation"]["size"] == [h, w]
        assert np.array_equal(coco_mask.decode(_coco(columns["box_segmentation"])).astype(bool), pixels)
        assert np.array_equal(coco_mask.decode(_coco(columns["segmentation"])).astype(bool), full)
        # the same RLE as pycocotools' own of the box cut from the full mask
        box = np.asfortranarray(full[y0 : y0 + h, x0 : x0 + w, None].astype(np.uint8))
        assert coco_mask.encode(box)[0]["counts"].decode() == columns["box_segmentation"]["counts"]


def test_full_image_rle_only_up_to_the_threshold(monkeypatch) -> None:
    pixels = np.ones((2, 3), dtype=bool)
    monkeypatch.setattr(rle, "MAX_FULL_RLE_PIXELS", 20 * 30)
    assert rle.mask_rle_columns(pixels, 4, 5, (20, 30))["segmentation"]["size"] == [20, 30]
    above = rle.mask_rle_columns(pixels, 4, 5, (20, 31))
    assert above["segmentation"] is None and above["box_segmentation"]["size"] == [2, 3]


def test_records_box_is_the_bbox_and_the_full_mask(monkeypatch) -> None:
    """Real masks of a photo: the box-local RLE spans bbox x..x+w, y..y+h inclusive, placed at
    box_origin it is the full-image RLE; over the threshold only the full RLE goes."""
    image = np.asarray(Image.open(DOG).convert("RGB"))
    engine = build_engine("vit_t", None, None)
    result = segment_scene(engine, ArrayScene(image), AmgParams(points_per_side=4), 1024, 128)
    records = result.records()
    assert records
    for record in records:
        x, y, w, h = record["bbox"]
        assert record["box_origin"] == [x, y] and record["box_segmentation"]["size"] == [h + 1, w + 1]
        placed = np.zeros(image.shape[:2], dtype=bool)
        box = rle.decode_rle(record["box_segmentation"])
        placed[int(y) : int(y) + box.shape[0], int(x) : int(x) + box.shape[1]] = box
        assert np.array_equal(placed, rle.decode_rle(record["segmentation"]))
        assert int(box.sum()) == record["area"]
    monkeypatch.setattr(rle, "MAX_FULL_RLE_PIXELS", image.shape[0] * image.shape[1] - 1)
    over = result.records()
    assert all(r["segmentation"] is None for r in over)
    assert [r["box_segmentation"] for r in over] == [r["box_segmentation"] for r in records]


def test_render_from_either_column() -> None:
    """An overlay drawn from box-local masks is the one drawn from full-image masks."""
    image = load_image(str(DOG))
    rng = np.random.default_rng(3)
    rows = []
    for x0, y0, h, w in ((10, 20, 50, 80), (300, 200, 120, 40), (0, 0, 534, 800)):
        pixels = rng.random((h, w)) < 0.6
        rows.append(rle.mask_rle_columns(pixels, x0, y0, image.shape[:2]))
    from_boxes = np.asarray(overlay(image, [box_mask(row) for row in rows]))
    full_only = [{"segmentation": row["segmentation"], "box_segmentation": None} for row in rows]
    assert np.array_equal(from_boxes, np.asarray(overlay(image, [box_mask(row) for row in full_only])))
    assert not np.array_equal(from_boxes, image)
    with pytest.raises(ValueError, match="does not fit"):
        overlay(image[:100], [box_mask(rows[1])])


@pytest.fixture(scope="module")
def over_threshold(tmp_path_factory) -> Path:
    """A job over the Landsat scene and dog.jpg with `MAX_FULL_RLE_PIXELS` between their sizes."""
    root = tmp_path_factory.mktemp("box")
    job = parse_job(
        {
            "name": "box-masks",
            "input": {"uris": [str(LANDSAT), str(DOG)]},
            "amg": {"points_per_side": 4},
            "output": {"uri": str(root / "out")},
            "run": {"executor": "local"},
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rle, "MAX_FULL_RLE_PIXELS", BETWEEN_THEM)
        summary = run_job(job)
    assert summary.images_ok == 2 and summary.masks > 0
    return root / "out"


def test_duckdb_reads_the_box_columns(over_threshold: Path) -> None:
    masks = f"read_parquet('{over_threshold}/masks/*.parquet')"
    rows = duckdb.sql(
        f"""SELECT image_uri, segmentation IS NULL, box_segmentation.size, box_segmentation.counts,
                   box_origin, bbox, area, geometry IS NOT NULL FROM {masks}"""
    ).fetchall()
    by_image = {uri: [row for row in rows if row[0] == uri] for uri in (str(LANDSAT), str(DOG))}
    assert all(by_image.values())
    assert all(row[1] and row[7] for row in by_image[str(LANDSAT)])  # only box-local RLE and the polygon
    assert not any(row[1] or row[7] for row in by_image[str(DOG)])
    for _, _, size, counts, origin, (x, y, w, h), area, _ in rows:
        assert origin == [x, y] and size == [h + 1, w + 1]
        assert int(coco_mask.area({"size": size, "counts": counts.encode()})) == area
    schema = pq.read_schema(next((over_threshold / "masks").glob("*.parquet")))
    assert schema.field("segmentation").nullable and not schema.field("box_segmentation").nullable


def test_render_a_scene_without_full_image_rle(over_threshold: Path, tmp_path: Path) -> None:
    png = tmp_path / "scene.png"
    assert cli_main(["render", str(over_threshold), str(LANDSAT), "-o", str(png)]) == 0
    drawn = np.asarray(Image.open(png))
    scene = load_image(str(LANDSAT))
    assert drawn.shape == scene.shape and not np.array_equal(drawn, scene)
    rows = pq.read_table(over_threshold / "masks").to_pylist()
    expected = overlay(scene, [box_mask(row) for row in rows if row["image_uri"] == str(LANDSAT)])
    assert np.array_equal(drawn, np.asarray(expected))
