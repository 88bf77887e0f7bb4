"""Automatic mask generation over a whole scene, tile by tile, into output records.

`tile_size_for` decides whether a scene is tiled at all (`raster.tiling`): by default a photo
goes through the generator whole, as the reference generator segments it, and georeferenced
scenes and images of more than `MAX_WHOLE_PIXELS` are tiled. A scene's work is three steps,
which an executor may run in different processes:

1. `plan_scene`: its tiles (`tiles.plan_tiles`) and georeferencing, from the header alone;
2. `segment_tile`, per tile with a valid pixel (`has_valid_pixels`; others never reach the
   model): `amg.generate_masks` on the tile's window, masks lying mostly on nodata dropped
   (and, when there are several tiles, empty masks, which thresholds at 0 keep), the rest
   placed in scene pixels and packed (`tile_masks.TileMasks`), with the tile's candidates
   (`pipeline.candidates`) when the job keeps them;
3. `finish_scene`: one set of objects across seams (`tiles.merge_tiles`).

`segment_scene` runs the three in this process, one window read at a time (memory bounded by
the tile, not the scene). `SceneResult.records` then writes the objects in scene pixels, with
the polygon in the scene's CRS for georeferenced scenes. A scene that fits in one tile gives
exactly the records of `amg.generate_masks` + `amg.to_records`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sam_batch.pipeline.geometry import crs_label, mask_geometry
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rasters import Scene
from sam_batch.pipeline.rle import mask_rle_columns
from sam_batch.pipeline.tile_masks import TileMasks, pack
from sam_batch.pipeline.tiles import SceneMask, Tile, is_cut, merge_tiles, plan_tiles

if TYPE_CHECKING:  # the generator imports torch, which the read and finish tasks never load
    from sam_batch.pipeline.amg import Check, Engine, Mask

MAX_NODATA_FRACTION = 0.5  # a mask with more of its pixels on nodata than this is dropped
# `raster.tiling: auto` segments an image that is not georeferenced whole up to this many pixels
# (4096 x 4096: a 12 MP phone photo goes whole); whole, every kept mask is a full-size bool array
MAX_WHOLE_PIXELS = 4096 * 4096


@dataclass
class SceneResult:
    """The objects of one scene and its facts.

    crs: 'EPSG:code' or WKT, None when not georeferenced; transform: the affine's six
    coefficients (a, b, c, d, e, f: x = a col + b row + c, y = d col + e row + f) or None.
    """

    width: int
    height: int
    masks: list[SceneMask]
    crs: str | None
    transform: list[float] | None
    tiles: int
    tiles_skipped: int
    candidates: list[dict] = field(default_factory=list)  # the tiles' candidates rows, in tile order

    def records(self) -> list[dict]:
        """`amg.to_records`'s records plus geometry (WKB) and geometry_bbox, in mask order."""
        affine = None
        if self.transform is not None:  # only georeferenced scenes need rasterio
            from rasterio.transform import Affine

            affine = Affine(*self.transform)
        return [_record(m, (self.height, self.width), affine) for m in self.masks]


def tile_size_for(scene: Scene, tiling: str, tile_size: int) -> int:
    """The tile size `segment_scene` should cut `scene` into, for `raster.tiling`:
    `tile_size`, or the scene's longest side (one tile: the image whole).

    auto: georeferenced scenes and images of more than `MAX_WHOLE_PIXELS` are tiled, others go
    whole; always: every image larger than `tile_size` is tiled; never: none is.
    """
    if tiling not in ("auto", "always", "never"):
        raise ValueError(f"raster.tiling {tiling!r} is not one of auto, always, never")
    longest = max(scene.width, scene.height, tile_size)
    if tiling == "never":
        return longest
    if tiling == "always" or scene.crs is not None or scene.width * scene.height > MAX_WHOLE_PIXELS:
        return tile_size
    return longest


@dataclass(frozen=True)
class ScenePlan:
    """How one image is segmented, known from its header before any of its pixels.

    width, height: pixels; crs, transform: as in `SceneResult`; tiles: the windows the
    generator runs on (`tiles.plan_tiles`; one when the image goes whole).
    """

    width: int
    height: int
    crs: str | None
    transform: list[float] | None
    tiles: tuple[Tile, ...]

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.height, self.width


def plan_scene(scene: Scene, tile_size: int, overlap: int) -> ScenePlan:
    """The plan of `scene` cut into tiles of `tile_size` (as `tile_size_for` gives it) that
    share `overlap` pixels (`raster.tile_overlap`)."""
    return ScenePlan(
        width=scene.width,
        height=scene.height,
        crs=crs_label(scene.crs),
        transform=list(scene.transform)[:6] if scene.transform is not None else None,
        tiles=tuple(plan_tiles(scene.width, scene.height, tile_size, overlap)),
    )


def has_valid_pixels(valid: np.ndarray | None) -> bool:
    """Whether a tile whose valid pixels are `valid` (None: all) is worth the model."""
    return valid is None or bool(valid.any())


def segment_tile(
    engine: Engine,
    rgb: np.ndarray,
    valid: np.ndarray | None,
    params: AmgParams,
    plan: ScenePlan,
    index: int,
    check: Check | None = None,
    floor: AmgParams | None = None,
) -> TileMasks:
    """The masks of tile `index` of `plan` whose pixels are `rgb` (h, w, 3) uint8 and `valid`
    (h, w) bool or None (all valid): `generate_masks` on the tile, then `place_tile_masks`.

    check: handed to `generate_masks` (between crops and point batches); raises to stop.
    floor: `params` at the candidates' thresholds (`params.candidate_floor`) to keep the tile's
    candidates at them (`pipeline.candidates`); the masks are the same either way.
    """
    from sam_batch.pipeline.amg import crop_survivors, generate_masks, image_candidates, merge_crops, no_check
    from sam_batch.pipeline.candidates import crop_row

    check = check or no_check
    if floor is None:
        return place_tile_masks(generate_masks(engine, rgb, params, check), valid, plan, index)
    rows, kept = [], []
    for number, crop in enumerate(image_candidates(engine, rgb, floor, check)):
        rows.append(crop_row(crop, number, index, len(plan.tiles), valid))
        kept.append(crop_survivors(crop, params))
    return place_tile_masks(merge_crops(kept, rgb.shape[:2], params), valid, plan, index, tuple(rows))


def place_tile_masks(
    masks: list[Mask], valid: np.ndarray | None, plan: ScenePlan, index: int, candidates: tuple[dict, ...] = ()
) -> TileMasks:
    """Tile `index`'s masks (`generate_masks`'), empty masks dropped where the scene has several
    tiles (thresholds at 0 keep them; they have no place to stand for across seams), masks mostly
    on nodata dropped (`valid`: the tile's (h, w) valid pixels or None), the rest placed in scene
    pixels and packed with the tile's `candidates` rows."""
    tile = plan.tiles[index]
    several = len(plan.tiles) > 1
    placed = [
        _place(mask, tile, index, plan.image_hw)
        for mask in masks
        if not (several and not mask.mask.any())
        and (valid is None or _nodata_fraction(mask.mask, valid) <= MAX_NODATA_FRACTION)
    ]
    return pack(placed, index, candidates)


def finish_scene(plan: ScenePlan, tiles: list[TileMasks], iou_threshold: float) -> SceneResult:
    """One set of objects from the masks of the tiles that were segmented (`tiles`, in any
    order; a tile with no valid pixel has none): the seam rule of `tiles.merge_tiles` at
    `iou_threshold` (`amg.crop_nms_thresh`)."""
    masks = [mask for packed in sorted(tiles, key=lambda t: t.tile) for mask in packed.unpack()]
    return SceneResult(
        width=plan.width,
        height=plan.height,
        masks=merge_tiles(masks, list(plan.tiles), iou_threshold),
        crs=plan.crs,
        transform=plan.transform,
        tiles=len(plan.tiles),
        tiles_skipped=len(plan.tiles) - len(tiles),
        candidates=[row for packed in sorted(tiles, key=lambda t: t.tile) for row in packed.candidates],
    )


TileSegmenter = Callable[[np.ndarray, "np.ndarray | None", int], TileMasks]  # (rgb, valid, tile index)


def segment_tiles(scene: Scene, plan: ScenePlan, segment: TileSegmenter, check: Check) -> list[TileMasks]:
    """Read the tiles of `plan` from `scene` one after another and `segment` each that has a
    valid pixel; `check` runs before every tile but the first (raises to stop)."""
    tiles = []
    for index, tile in enumerate(plan.tiles):
        if index:
            check()
        rgb, valid = scene.read(tile.window)
        if has_valid_pixels(valid):
            tiles.append(segment(rgb, valid, index))
    return tiles


def segment_scene(
    engine: Engine, scene: Scene, params: AmgParams, tile_size: int, overlap: int, check: Check | None = None
) -> SceneResult:
    """All objects of a scene, one record each, in deterministic order (tile, then mask order):
    its tiles read and segmented one after another in this process.

    check: called before every tile but the first, and by `generate_masks` within each tile;
    raises to stop the scene (a time budget).
    """
    from sam_batch.pipeline.amg import no_check

    plan = plan_scene(scene, tile_size, overlap)
    check = check or no_check

    def segment(rgb: np.ndarray, valid: np.ndarray | None, index: int) -> TileMasks:
        return segment_tile(engine, rgb, valid, params, plan, index, check)

    return finish_scene(plan, segment_tiles(scene, plan, segment, check), params.crop_nms_thresh)


def _place(mask: Mask, tile: Tile, index: int, image_hw: tuple[int, int]) -> SceneMask:
    """A tile's full-tile mask as the pixels of its box, in scene pixels."""
    tx, ty = tile.window[:2]
    x0, y0, x1, y1 = (int(v) for v in mask.box)
    cx0, cy0, cx1, cy1 = mask.crop_box
    placed = SceneMask(
        pixels=mask.mask[y0 : y1 + 1, x0 : x1 + 1].copy(),
        x0=x0 + tx,
        y0=y0 + ty,
        iou=mask.iou,
        stability=mask.stability,
        point=[mask.point[0] + tx, mask.point[1] + ty],
        crop_box=[cx0 + tx, cy0 + ty, cx1 + tx, cy1 + ty],
        tile=index,
    )
    placed.cut = is_cut(placed.box, tile.window, image_hw)
    return placed


def _nodata_fraction(mask: np.ndarray, valid: np.ndarray) -> float:
    area = int(mask.sum())
    return float((mask & ~valid).sum()) / area if area else 0.0


def _record(mask: SceneMask, image_hw: tuple[int, int], transform) -> dict:
    """One output record; bbox is XYWH with W = x1 - x0 (x1 the last pixel), as the reference's.
    The mask as RLE over the image and over its box: `rle.mask_rle_columns`."""
    x0, y0, x1, y1 = mask.box
    cx0, cy0, cx1, cy1 = mask.crop_box
    geometry = mask_geometry(mask.pixels, mask.x0, mask.y0, transform) if transform is not None else None
    return {
        **mask_rle_columns(mask.pixels, mask.x0, mask.y0, image_hw),
        "area": mask.area,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "predicted_iou": mask.iou,
        "point_coords": [mask.point],
        "stability_score": mask.stability,
        "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
        "geometry": geometry[0] if geometry else None,
        "geometry_bbox": geometry[1] if geometry else None,
    }
