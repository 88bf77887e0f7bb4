"""Candidate masks as rows of the `candidates` table (`tables.CANDIDATES_SCHEMA`), and back
(`output.candidates`).

One row per crop of a tile that went through the model, its candidates in a list, in the
order `amg.segment_crop` made them (before any NMS), each with everything the model-free steps
of the generator need (`amg.masks_from_candidates`): its box, its pixels as COCO RLE over that
box, its predicted IoU and stability score as the filters saw them (float32), its prompt.
Coordinates are the tile's pixels, which are the image's for an image segmented whole. The
crop's row is there even with no candidate, so every segmented tile and crop is accounted for.

`crop_row` and `crops_from_rows` are exact inverses, so the masks made from rows read back
are those the run made; `refilter_image` makes them at other model-free parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from sam_batch.pipeline.amg import CropMasks, masks_from_candidates
from sam_batch.pipeline.held_masks import BoxedMasks
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rle import decode_rle, encode_rle
from sam_batch.pipeline.scenes import ScenePlan, SceneResult, finish_scene, place_tile_masks
from sam_batch.pipeline.tiles import plan_tiles


def crop_row(crop: CropMasks, crop_index: int, tile: int, n_tiles: int, valid: np.ndarray | None) -> dict:
    """One crop's candidates as a row (`tables.candidate_rows` adds `image_uri`, `image_id`).

    crop: on any device; crop_index: its place in the tile's crops; tile: the tile's index in
    the scene's plan of `n_tiles`; valid: the tile's (h, w) valid pixels, None where all are
    valid; `nodata` says which, and the first crop's row holds them as COCO RLE (`valid`).
    box: XYXY, last pixel inclusive, in tile pixels; crop_box: XYXY, exclusive, in tile pixels.
    """
    iou, stability = crop.iou.cpu(), crop.stability.cpu()
    candidates = []
    for i, box in enumerate(crop.boxes.cpu().tolist()):
        candidates.append(
            {
                "box": [int(v) for v in box],
                "box_segmentation": encode_rle(crop.masks.box_pixels(i)),  # only the box leaves the device
                "predicted_iou": float(iou[i]),
                "stability_score": float(stability[i]),
                "point": [float(v) for v in crop.points[i].tolist()],
            }
        )
    return {
        "tile": tile,
        "n_tiles": n_tiles,
        "nodata": valid is not None,
        "valid": encode_rle(valid) if valid is not None and crop_index == 0 else None,
        "crop_index": crop_index,
        "crop_box": [int(v) for v in crop.crop_box],
        "candidates": candidates,
    }


def crops_from_rows(rows: list[dict]) -> list[CropMasks]:
    """The crops' candidates of one tile from its rows (in any order), in crop order, on the
    host, as `crop_row` was given them (IoU and stability as float32 tensors, boxes int64)."""
    crops = []
    for row in sorted(rows, key=lambda r: r["crop_index"]):
        x0, y0, x1, y1 = row["crop_box"]
        candidates = row["candidates"]
        boxes = torch.tensor([c["box"] for c in candidates], dtype=torch.int64).reshape(-1, 4)
        bits = [np.packbits(decode_rle(c["box_segmentation"]), axis=None) for c in candidates]
        masks = BoxedMasks((y1 - y0, x1 - x0), boxes - torch.tensor([x0, y0, x0, y0]), bits)
        crops.append(
            CropMasks(
                masks=masks,
                boxes=boxes,
                iou=torch.tensor([c["predicted_iou"] for c in candidates], dtype=torch.float32),
                stability=torch.tensor([c["stability_score"] for c in candidates], dtype=torch.float32),
                points=torch.tensor([c["point"] for c in candidates], dtype=torch.float64).reshape(-1, 2),
                crop_box=[x0, y0, x1, y1],
            )
        )
    return crops


def refilter_image(
    rows: list[dict],
    width: int,
    height: int,
    crs: str | None,
    transform: list[float] | None,
    tile_size: int,
    tile_overlap: int,
    params: AmgParams,
) -> SceneResult:
    """The objects of an image, segmented whole or in tiles, made again from its candidates'
    rows at `params` (`amg.masks_from_candidates` per tile, the nodata rule where a tile's first
    row holds its valid pixels, then the seam rule of `scenes.finish_scene`), exactly as
    `scenes.segment_tile` and `finish_scene` made them in the run: the rows' candidates must
    have been kept at thresholds at or below `params`'. A tile without rows had no valid pixel
    and was skipped, as in the run.
    width, height: pixels; crs, transform: the images row's; tile_size, tile_overlap: the run's
    `raster` section, which cut the image into the rows' `n_tiles` (one: whole)."""
    n_tiles = rows[0]["n_tiles"] if rows else 1
    size = max(width, height) if n_tiles == 1 else tile_size
    plan = ScenePlan(width, height, crs, transform, tuple(plan_tiles(width, height, size, tile_overlap)))
    if len(plan.tiles) != n_tiles:
        raise ValueError(
            f"{width}x{height} in tiles of {tile_size} overlapping {tile_overlap} makes {len(plan.tiles)} tiles, "
            f"not the {n_tiles} the run segmented"
        )
    by_tile: dict[int, list[dict]] = {}
    for row in rows:
        by_tile.setdefault(row["tile"], []).append(row)
    tiles = []
    for index, tile_rows in sorted(by_tile.items()):
        x0, y0, x1, y1 = plan.tiles[index].window
        masks = masks_from_candidates(crops_from_rows(tile_rows), (y1 - y0, x1 - x0), params)
        tiles.append(place_tile_masks(masks, _valid_pixels(tile_rows), plan, index))
    return finish_scene(plan, tiles, params.crop_nms_thresh)


def _valid_pixels(tile_rows: list[dict]) -> np.ndarray | None:
    """A tile's (h, w) valid pixels from its first crop's row; None where all were valid."""
    first = min(tile_rows, key=lambda r: r["crop_index"])
    return decode_rle(first["valid"]).astype(bool) if first["nodata"] else None
