"""Tile planning, the seam rule and RLE placement: pure functions on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from sam_batch.pipeline.rle import encode_rle, encode_rle_placed
from sam_batch.pipeline.tiles import SceneMask, Tile, is_cut, merge_tiles, plan_tiles


@pytest.mark.parametrize(
    ("width", "height", "tile_size", "overlap"),
    [(800, 534, 1024, 128), (1800, 1200, 1024, 128), (5000, 3001, 1024, 128), (791, 718, 512, 100), (1025, 64, 1024, 0)],
)
def test_tiles_cover_the_image_and_cores_partition_it(width: int, height: int, tile_size: int, overlap: int) -> None:
    tiles = plan_tiles(width, height, tile_size, overlap)
    seen = np.zeros((height, width), dtype=np.int32)
    covered = np.zeros((height, width), dtype=bool)
    for tile in tiles:
        x0, y0, x1, y1 = tile.window
        assert x1 - x0 == min(tile_size, width) and y1 - y0 == min(tile_size, height)
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        covered[y0:y1, x0:x1] = True
        cx0, cy0, cx1, cy1 = tile.core
        assert x0 <= cx0 < cx1 <= x1 and y0 <= cy0 < cy1 <= y1
        seen[cy0:cy1, cx0:cx1] += 1
    assert covered.all()
    assert (seen == 1).all()
    xs = sorted({t.window[0] for t in tiles})
    ends = sorted({t.window[2] for t in tiles})
    assert all(ends[i] - xs[i + 1] >= overlap for i in range(len(xs) - 1))


def test_one_tile_when_the_image_fits() -> None:
    assert plan_tiles(1024, 700, 1024, 128) == [Tile((0, 0, 1024, 700), (0, 0, 1024, 700))]


def test_is_cut_only_on_inner_edges() -> None:
    window, image_hw = (100, 0, 300, 200), (200, 400)
    assert is_cut((100, 50, 120, 60), window, image_hw)  # left edge, inside the image
    assert is_cut((250, 50, 299, 60), window, image_hw)  # right edge
    assert not is_cut((150, 0, 160, 199), window, image_hw)  # top and bottom are the image's
    assert not is_cut((101, 50, 298, 60), window, image_hw)


# Two tiles side by side on a 100 x 60 image: windows x 0-60 and 40-100, cores split at 50.
TILES = [Tile((0, 0, 60, 60), (0, 0, 50, 60)), Tile((40, 0, 100, 60), (50, 0, 100, 60))]
IMAGE_HW = (60, 100)


def _mask(tile: int, x0: int, y0: int, x1: int, y1: int, iou: float = 0.95) -> SceneMask:
    """A rectangle (inclusive XYXY in image pixels) as tile `tile` sees it: clipped to its window."""
    wx0, wy0, wx1, wy1 = TILES[tile].window
    x0, y0, x1, y1 = max(x0, wx0), max(y0, wy0), min(x1, wx1 - 1), min(y1, wy1 - 1)
    mask = SceneMask(
        pixels=np.ones((y1 - y0 + 1, x1 - x0 + 1), dtype=bool),
        x0=x0,
        y0=y0,
        iou=iou,
        stability=0.97,
        point=[float(x0), float(y0)],
        crop_box=list(TILES[tile].window),
        tile=tile,
    )
    mask.cut = is_cut(mask.box, TILES[tile].window, IMAGE_HW)
    return mask


def _boxes(masks: list[SceneMask]) -> list[tuple[int, int, int, int]]:
    return [m.box for m in masks]


def test_object_in_the_shared_strip_is_kept_once_from_the_tile_whose_core_holds_it() -> None:
    left, right = _mask(0, 42, 10, 47, 20, iou=0.90), _mask(1, 42, 10, 47, 20, iou=0.99)
    kept = merge_tiles([left, right], TILES, 0.7)
    assert len(kept) == 1 and kept[0].tile == 0  # centre x 45 lies in tile 0's core


def test_object_across_the_seam_seen_whole_by_one_tile_is_kept_whole() -> None:
    whole = _mask(0, 20, 10, 55, 20)  # whole in tile 0 (x 0-59), centre in tile 0's core
    part = _mask(1, 20, 10, 55, 20)  # tile 1 sees x 40-55, cut at its left edge
    assert not whole.cut and part.cut
    kept = merge_tiles([whole, part], TILES, 0.7)
    assert _boxes(kept) == [(20, 10, 55, 20)] and kept[0].tile == 0


def test_whole_copy_wins_even_when_its_centre_is_in_the_other_core() -> None:
    whole = _mask(1, 45, 10, 70, 20)  # whole in tile 1, centre x 58 in tile 1's core
    part = _mask(0, 45, 10, 70, 20)  # tile 0 sees x 45-59, cut
    kept = merge_tiles([part, whole], TILES, 0.7)
    assert _boxes(kept) == [(45, 10, 70, 20)] and kept[0].tile == 1


def test_object_larger_than_the_halo_is_stitched_into_one_mask() -> None:
    left = _mask(0, 5, 30, 95, 40)  # tile 0 sees x 5-59
    right = _mask(1, 5, 30, 95, 40)  # tile 1 sees x 40-95
    assert left.cut and right.cut
    kept = merge_tiles([left, right], TILES, 0.7)
    assert len(kept) == 1
    assert kept[0].box == (5, 30, 95, 40) and kept[0].area == 91 * 11 and kept[0].pixels.all()
    assert kept[0].crop_box == [0, 0, 100, 60]


def test_distinct_objects_and_masks_of_one_tile_all_stay() -> None:
    a, b = _mask(0, 5, 5, 20, 20), _mask(0, 6, 6, 21, 21)  # same tile: NMS already happened there
    c = _mask(1, 70, 40, 90, 55)
    kept = merge_tiles([a, b, c], TILES, 0.7)
    assert _boxes(kept) == [a.box, b.box, c.box]


def test_parts_that_disagree_on_the_shared_strip_are_not_merged() -> None:
    top = _mask(0, 5, 0, 59, 10)  # cut at x = 59
    bottom = _mask(1, 40, 40, 95, 55)  # cut at x = 40, elsewhere
    kept = merge_tiles([top, bottom], TILES, 0.7)
    assert len(kept) == 2


def test_single_tile_is_left_alone() -> None:
    tiles = [Tile((0, 0, 100, 60), (0, 0, 100, 60))]
    masks = [_mask(0, 1, 1, 5, 5)]
    assert merge_tiles(masks, tiles, 0.7) is masks


def test_placed_rle_equals_full_image_rle() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = int(rng.integers(y0, height)) + 1, int(rng.integers(x0, width)) + 1
        pixels = rng.random((y1 - y0, x1 - x0)) < rng.random()
        full = np.zeros((height, width), dtype=bool)
        full[y0:y1, x0:x1] = pixels
        assert encode_rle_placed(pixels, x0, y0, (height, width)) == encode_rle(full)
