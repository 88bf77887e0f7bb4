"""Automatic mask generation over a whole scene, tile by tile, into output records.

`tile_size_for` decides whether a scene is tiled at all (`raster.tiling`): by default a photo
goes through the generator whole, as the reference generator segments it, and georeferenced
scenes and images of more than `MAX_WHOLE_PIXELS` are tiled. `segment_scene` cuts the scene
into tiles (`tiles.plan_tiles`), reads one window at a time (memory bounded by the tile, not the
scene), skips tiles with no valid pixel before the model, runs `amg.generate_masks` on each
tile, drops masks lying mostly on nodata (and, when there are several tiles, empty masks, which
thresholds at 0 keep), makes one set of objects across seams (`tiles.merge_tiles`).
`SceneResult.records` then writes them in scene pixels, with the polygon in the scene's CRS for
georeferenced scenes. A scene that fits in one tile gives exactly the records of
`amg.generate_masks` + `amg.to_records`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam_batch.pipeline.amg import Check, Engine, Mask, generate_masks, no_check
from sam_batch.pipeline.geometry import crs_label, mask_geometry
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rasters import Scene
from sam_batch.pipeline.rle import mask_rle_columns
from sam_batch.pipeline.tiles import SceneMask, Tile, is_cut, merge_tiles, plan_tiles

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


def segment_scene(
    engine: Engine, scene: Scene, params: AmgParams, tile_size: int, overlap: int, check: Check = no_check
) -> SceneResult:
    """All objects of a scene, one record each, in deterministic order (tile, then mask order).

    check: called before every tile but the first, and by `generate_masks` within each tile;
    raises to stop the scene (a time budget).
    """
    image_hw = (scene.height, scene.width)
    tiles = plan_tiles(scene.width, scene.height, tile_size, overlap)
    masks: list[SceneMask] = []
    skipped = 0
    for index, tile in enumerate(tiles):
        if index:
            check()
        rgb, valid = scene.read(tile.window)
        if valid is not None and not valid.any():
            skipped += 1
            continue
        for mask in generate_masks(engine, rgb, params, check):
            if len(tiles) > 1 and not mask.mask.any():
                continue  # an empty mask (thresholds at 0) has no place to stand for across seams
            placed = _place(mask, tile, index, image_hw)
            if valid is None or _nodata_fraction(mask.mask, valid) <= MAX_NODATA_FRACTION:
                masks.append(placed)
    return SceneResult(
        width=scene.width,
        height=scene.height,
        masks=merge_tiles(masks, tiles, params.crop_nms_thresh),
        crs=crs_label(scene.crs),
        transform=list(scene.transform)[:6] if scene.transform is not None else None,
        tiles=len(tiles),
        tiles_skipped=skipped,
    )


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
