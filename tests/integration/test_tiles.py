"""Tile planning, the seam rule and RLE placement: pure functions on hand-made masks, the seam
rule against a brute-force copy of itself on the synthetic scenes of benchmarks/merge_scaling.py,
no duplicates across tiles on the Landsat scene with the real model, and `sam-batch run` of a
tiled strip of it with HQ-SAM and SAM 2.1 against their generators tile by tile."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window
from test_run_end_to_end import sam_batch, write_job

from sam_batch.engines.factory import build_engine
from sam_batch.pipeline import tiles as tiles_module
from sam_batch.pipeline.amg import Engine, generate_masks
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rasters import RasterScene
from sam_batch.pipeline.rle import decode_rle, encode_rle, encode_rle_placed
from sam_batch.pipeline.scenes import ScenePlan, finish_scene, place_tile_masks, plan_scene, segment_scene
from sam_batch.pipeline.tile_masks import TileMasks
from sam_batch.pipeline.tiles import DUPLICATE_MASK_IOU, SceneMask, Tile, is_cut, merge_tiles, plan_tiles
from shared_data import IMAGES, MOBILE_SAM, REPO


@pytest.mark.parametrize(
    ("width", "height", "tile_size", "overlap"),
    [
        (800, 534, 1024, 128),
        (1800, 1200, 1024, 128),
        (5000, 3001, 1024, 128),
        (791, 718, 512, 100),
        (1025, 64, 1024, 0),
    ],
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


def _with_tail(mask: SceneMask, rows: int) -> SceneMask:
    """The mask with a 1-pixel-wide tail `rows` long below its first column: a far taller box, few more pixels."""
    height, width = mask.pixels.shape
    pixels = np.zeros((height + rows, width), dtype=bool)
    pixels[:height] = mask.pixels
    pixels[height:, 0] = True
    mask.pixels = pixels
    return mask


def test_copies_whose_boxes_differ_but_pixels_agree_are_one_object() -> None:
    plain = _mask(0, 42, 10, 47, 30)  # in the shared strip, whole in both tiles; centre x 45: tile 0's core
    tailed = _with_tail(_mask(1, 42, 10, 47, 30, iou=0.99), 20)  # box (42, 10, 47, 50)
    assert not plain.cut and not tailed.cut
    box_iou = tiles_module._box_iou(np.array([plain.box], float), np.array([tailed.box], float))[0]
    mask_iou = plain.area / tailed.area
    assert box_iou < 0.7 and mask_iou > DUPLICATE_MASK_IOU  # 0.5 and 0.86
    kept = merge_tiles([plain, tailed], TILES, 0.7)
    assert len(kept) == 1 and kept[0].tile == 0  # today's priority: the copy centred in its own core


def test_a_part_inside_a_whole_of_another_tile_is_not_its_duplicate() -> None:
    whole = _mask(0, 10, 10, 55, 50)  # tile 0 sees it whole
    inside = _mask(1, 42, 20, 52, 30)  # a smaller object on it, seen by tile 1: all its pixels inside
    kept = merge_tiles([whole, inside], TILES, 0.7)
    assert _boxes(kept) == [whole.box, inside.box]  # mask IoU 0.06: not one object (SAM nests masks)


def test_scene_masks_hold_their_pixels_packed() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        pixels = rng.random((height, width)) < 0.4
        mask = SceneMask(pixels, 7, 3, 0.9, 0.95, [7.0, 3.0], [0, 0, 40, 40])
        assert mask.bits.shape == (height, (width + 7) // 8) and mask.bits.dtype == np.uint8
        assert np.array_equal(mask.pixels, pixels) and mask.pixels.dtype == bool
        assert mask.area == pixels.sum() and mask.box == (7, 3, 7 + width - 1, 3 + height - 1)
        window = (
            sorted(int(v) for v in rng.integers(7, 8 + width, 2)),
            sorted(int(v) for v in rng.integers(3, 4 + height, 2)),
        )
        (x0, x1), (y0, y1) = window
        assert np.array_equal(tiles_module._view(mask, x0, y0, x1, y1), pixels[y0 - 3 : y1 - 3, x0 - 7 : x1 - 7])


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


def _merge_scaling():
    """benchmarks/merge_scaling.py, whose synthetic scenes are the ones measured in docs/benchmarks.md."""
    spec = importlib.util.spec_from_file_location("merge_scaling", REPO / "benchmarks" / "merge_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_scaling"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _outcome(masks: list[SceneMask]) -> list[tuple]:
    return [
        (m.tile, m.parts, m.box, m.area, m.iou, m.stability, m.point, m.crop_box, m.cut, m.bits.tobytes())
        for m in masks
    ]


@pytest.mark.parametrize("duplicate_mask_iou", [DUPLICATE_MASK_IOU, 1.0], ids=["as-is", "box-iou-only"])
@pytest.mark.parametrize(("size", "seed"), [(1920, 0), (2816, 1), (2816, 2), (3712, 3)])
def test_merge_equals_comparing_every_pair(size: int, seed: int, duplicate_mask_iou: float, monkeypatch) -> None:
    """The seam rule compares only masks on shared strips: the same result as comparing every
    pair, as the rule was first written (1.0: without the mask IoU criterion, the rule before it)."""
    monkeypatch.setattr(tiles_module, "DUPLICATE_MASK_IOU", duplicate_mask_iou)
    masks, tiles = _merge_scaling().synthetic_scene(size, seed, masks_per_tile=30, crossing_share=0.4)
    expected, fired = _brute_force_merge(masks, tiles, 0.7, duplicate_mask_iou)
    assert _outcome(merge_tiles(masks, tiles, 0.7)) == _outcome(expected)
    assert fired["box duplicate"] and fired["covered"] and fired["stitched"]  # every rule had work to do
    assert fired["mask duplicate"] or duplicate_mask_iou == 1.0


def _brute_force_merge(
    masks: list[SceneMask], tiles: list[Tile], iou_threshold: float, duplicate_mask_iou: float
) -> tuple[list[SceneMask], dict[str, int]]:
    """The seam rule comparing every pair of masks: pipeline/tiles.py's first version, plus the
    mask IoU criterion; and how often each rule fired."""
    fired = dict.fromkeys(["box duplicate", "mask duplicate", "covered", "stitched"], 0)
    for index, mask in enumerate(masks):
        mask.parts = [index]

    def priority(mask: SceneMask) -> tuple:
        x0, y0, x1, y1 = mask.box
        cx0, cy0, cx1, cy1 = tiles[mask.tile].core
        centre_x, centre_y = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        return (mask.cut, not (cx0 <= centre_x < cx1 and cy0 <= centre_y < cy1), -mask.iou)

    kept: list[SceneMask] = []
    for i in sorted(range(len(masks)), key=lambda i: (priority(masks[i]), i)):
        mask = masks[i]
        rivals = [k for k in kept if k.tile != mask.tile and _windows_overlap(tiles[k.tile], tiles[mask.tile])]
        if any(_box_iou(mask.box, k.box) > iou_threshold for k in rivals):
            fired["box duplicate"] += 1
        elif any(_pixels_iou(mask, k) > duplicate_mask_iou for k in rivals):
            fired["mask duplicate"] += 1
        else:
            kept.append(mask)
    whole = [m for m in kept if not m.cut]
    parts = []
    for m in kept:
        if m.cut and any(o.tile != m.tile and _pixels_in_both(m, o) > 0.5 * m.area for o in whole):
            fired["covered"] += 1
        elif m.cut:
            parts.append(m)
    group = list(range(len(parts)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i, a in enumerate(parts):
        for j in range(i + 1, len(parts)):
            b = parts[j]
            if a.tile != b.tile and _pixels_in_both(a, b) and _agree_on_shared_window(a, b, tiles):
                group[root(j)] = root(i)
    groups: dict[int, list[SceneMask]] = {}
    for i, part in enumerate(parts):
        groups.setdefault(root(i), []).append(part)
    stitched = []
    for members in groups.values():
        fired["stitched"] += len(members) > 1
        stitched.append(members[0] if len(members) == 1 else _union_of(members, tiles))
    return sorted(whole + stitched, key=lambda m: (m.tile, m.parts[0])), fired


def _windows_overlap(a: Tile, b: Tile) -> bool:
    return (
        a.window[0] < b.window[2]
        and b.window[0] < a.window[2]
        and a.window[1] < b.window[3]
        and b.window[1] < a.window[3]
    )


def _box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """As the reference's NMS counts inclusive boxes: (x1 - x0) * (y1 - y0)."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / max(area_a + area_b - inter, 1e-9)


def _pixels_in_both(a: SceneMask, b: SceneMask, window: tuple[int, int, int, int] | None = None) -> int:
    """Pixels set in both masks, optionally only inside an XYXY window (end exclusive)."""
    x0, y0 = max(a.box[0], b.box[0], window[0] if window else 0), max(a.box[1], b.box[1], window[1] if window else 0)
    x1, y1 = min(a.box[2], b.box[2]) + 1, min(a.box[3], b.box[3]) + 1
    if window is not None:
        x1, y1 = min(x1, window[2]), min(y1, window[3])
    if x0 >= x1 or y0 >= y1:
        return 0
    return int((_region(a, x0, y0, x1, y1) & _region(b, x0, y0, x1, y1)).sum())


def _region(mask: SceneMask, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return mask.pixels[y0 - mask.y0 : y1 - mask.y0, x0 - mask.x0 : x1 - mask.x0]


def _pixels_iou(a: SceneMask, b: SceneMask) -> float:
    inter = _pixels_in_both(a, b)
    return inter / (a.area + b.area - inter) if inter else 0.0


def _agree_on_shared_window(a: SceneMask, b: SceneMask, tiles: list[Tile]) -> bool:
    wa, wb = tiles[a.tile].window, tiles[b.tile].window
    shared = (max(wa[0], wb[0]), max(wa[1], wb[1]), min(wa[2], wb[2]), min(wa[3], wb[3]))
    inter = _pixels_in_both(a, b, shared)
    union = _pixels_in_both(a, a, shared) + _pixels_in_both(b, b, shared) - inter
    return union > 0 and inter >= 0.5 * union


def _union_of(members: list[SceneMask], tiles: list[Tile]) -> SceneMask:
    largest = max(members, key=lambda m: (m.area, -m.tile))
    x0, y0 = min(m.box[0] for m in members), min(m.box[1] for m in members)
    x1, y1 = max(m.box[2] for m in members) + 1, max(m.box[3] for m in members) + 1
    pixels = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for m in members:
        height, width = m.pixels.shape
        pixels[m.y0 - y0 : m.y0 - y0 + height, m.x0 - x0 : m.x0 - x0 + width] |= m.pixels
    windows = [tiles[m.tile].window for m in members]
    first = min(members, key=lambda m: (m.tile, m.parts[0]))
    return SceneMask(
        pixels=pixels,
        x0=x0,
        y0=y0,
        iou=largest.iou,
        stability=largest.stability,
        point=largest.point,
        crop_box=[
            min(w[0] for w in windows),
            min(w[1] for w in windows),
            max(w[2] for w in windows),
            max(w[3] for w in windows),
        ],
        tile=first.tile,
        cut=largest.cut,
        parts=sorted(i for m in members for i in m.parts),
    )


@pytest.fixture(scope="module")
def engine():
    return build_engine("vit_t", str(MOBILE_SAM), device="cpu")


def _upsampled_landsat(path: Path) -> Path:
    """The Landsat scene at twice its resolution (each pixel 2 × 2), georeferencing to match."""
    with rasterio.open(IMAGES / "RGB.byte.tif") as src:
        pixels, profile = src.read(), src.profile
    pixels = pixels.repeat(2, axis=1).repeat(2, axis=2)
    profile.update(height=pixels.shape[1], width=pixels.shape[2], transform=profile["transform"] @ Affine.scale(0.5))
    profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("scale", "tile_size"), [(1, 512), (2, 1024)])
def test_no_object_twice_across_tiles_on_the_landsat_scene(scale: int, tile_size: int, tmp_path: Path, engine) -> None:
    """16 x 16 points per tile, overlap 128: no two masks of different tiles have mask IoU above 0.5.

    Box NMS alone left one such pair on the upsampled scene at 1024 (mask IoU 0.55, box IoU 0.63).
    """
    uri = str(IMAGES / "RGB.byte.tif") if scale == 1 else str(_upsampled_landsat(tmp_path / "landsat-2x.tif"))
    with RasterScene(uri) as scene:
        result = segment_scene(engine, scene, AmgParams(points_per_side=16), tile_size, 128)
    assert result.tiles == 4 and len(result.masks) >= 10
    masks = result.masks
    pairs = [(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :] if a.tile != b.tile]
    assert max(_pixels_iou(a, b) for a, b in pairs) <= DUPLICATE_MASK_IOU


# A strip of the Landsat scene (some nodata in its corner) cut into three tiles of 256 x 200, not
# square: SAM 2.1 stretches each to 1024 x 1024, HQ-SAM scales it to 1024 wide and pads it;
# neighbours share 64 pixels.
STRIP = (80, 250, 640, 200)  # column, row, width, height in the scene
STRIP_TILE_SIZE, STRIP_OVERLAP = 256, 32
# thresholds at which the seeded weights (`hq_checkpoint`, `sam2_checkpoint`) keep a few masks a tile
MODEL_AMG = {
    "vit_t_hq": {"points_per_side": 4, "stability_score_thresh": 0.7},
    "sam2.1_hiera_t": {"points_per_side": 4, "pred_iou_thresh": 0.56, "stability_score_thresh": 0.35},
}


def _landsat_strip(path: Path) -> Path:
    """`STRIP` of the Landsat scene as a GeoTIFF of its own, georeferenced to match."""
    column, row, width, height = STRIP
    with rasterio.open(IMAGES / "RGB.byte.tif") as src:
        pixels, profile = src.read(window=Window(column, row, width, height)), src.profile
    profile.update(width=width, height=height, transform=profile["transform"] @ Affine.translation(column, row))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def _tiles_generator_masks(
    engine: Engine, path: Path, params: AmgParams
) -> tuple[ScenePlan, list[TileMasks], list[np.ndarray]]:
    """The plan of the scene at `path` and its tiles' masks as the pipeline makes them in this
    process from the generator's masks on each tile's pixels (`generate_masks`, then the nodata
    rule and placing: `place_tile_masks`); and the generator's masks themselves, each over the
    whole scene (H, W) bool, placed here at its tile's offset."""
    with RasterScene(str(path)) as scene:
        plan = plan_scene(scene, STRIP_TILE_SIZE, STRIP_OVERLAP)
        tiles, generated = [], []
        for index, tile in enumerate(plan.tiles):
            rgb, valid = scene.read(tile.window)
            masks = generate_masks(engine, rgb, params)
            tiles.append(place_tile_masks(masks, valid, plan, index))
            x0, y0, x1, y1 = tile.window
            for mask in masks:
                full = np.zeros(plan.image_hw, dtype=bool)
                full[y0:y1, x0:x1] = mask.mask
                generated.append(full)
    return plan, tiles, generated


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "checkpoint"), [("vit_t_hq", "hq_checkpoint"), ("sam2.1_hiera_t", "sam2_checkpoint")]
)
def test_a_tiled_scene_is_its_tiles_generator_masks_after_the_seam_rule(
    tmp_path: Path, request: pytest.FixtureRequest, model_type: str, checkpoint: str
) -> None:
    """`sam-batch run` on a GeoTIFF cut into three tiles writes, mask for mask, what the model's
    generator gives on each tile's pixels after the nodata and seam rules; every mask written is
    one of those masks in scene pixels or the union of several (stitched across a seam), and no
    two masks of different tiles are one object."""
    weights = str(request.getfixturevalue(checkpoint))
    strip = _landsat_strip(tmp_path / "strip.tif")
    out = tmp_path / "out"
    job = write_job(
        tmp_path,
        "tiled",
        [str(strip)],
        out,
        model={"type": model_type, "checkpoint": weights},
        amg=MODEL_AMG[model_type],
        raster={"tile_size": STRIP_TILE_SIZE, "tile_overlap": STRIP_OVERLAP},
        run={"executor": "local"},
    )
    sam_batch("run", str(job))
    rows = pq.read_table(out / "masks").sort_by("mask_id").to_pylist()
    params = AmgParams(**MODEL_AMG[model_type])
    plan, tiles, generated = _tiles_generator_masks(build_engine(model_type, weights, device="cpu"), strip, params)
    expected = finish_scene(plan, tiles, params.crop_nms_thresh)
    assert expected.tiles == 3 and len({mask.tile for mask in expected.masks}) >= 2
    assert len(expected.masks) < sum(len(tile.unpack()) for tile in tiles)  # the seam rule had work
    records = expected.records()
    for key in ("segmentation", "area", "bbox", "geometry"):
        assert [row[key] for row in rows] == [record[key] for record in records], key
    for row in rows:
        written = decode_rle(row["segmentation"]).astype(bool)
        inside = [mask for mask in generated if not (mask & ~written).any()]
        assert inside and np.array_equal(np.logical_or.reduce(inside), written)
    masks = expected.masks
    pairs = [(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :] if a.tile != b.tile]
    assert all(_pixels_iou(a, b) <= DUPLICATE_MASK_IOU for a, b in pairs)
