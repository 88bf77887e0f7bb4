"""Automatic mask generation for one image, with the reference generator's semantics.

Reads top-down in four steps:
1. `segment_crop` — encode one crop, decode its point grid in batches, and keep, on the
   engine's device, only the masks that pass the IoU, stability and crop-edge filters: the
   crop's *candidates*, in prompt order, before any NMS.
2. `masks_from_candidates` — each crop's candidates filtered again at the parameters'
   thresholds (a no-op when they were made at them) and box NMS within the crop, then
   `merge_crops`: NMS across crops (smaller crops win), the optional small-region cleanup
   followed by NMS again. No model here: candidates made at lower thresholds (a floor,
   `params.candidate_floor`) give exactly the masks of any thresholds at or above it.
3. `to_records` — COCO RLE over the full image, boxes XYWH, points and crop boxes, in the
   order the masks were kept (the deterministic `mask_id` order).

`generate_masks` runs them for an image held in memory; `image_candidates` stops after step 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import torch

from sam_batch.pipeline.grids import crop_boxes, point_grids_per_layer
from sam_batch.pipeline.held_masks import BoxedMasks, DeviceMasks
from sam_batch.pipeline.masks import (
    box_near_crop_edge,
    box_nms,
    masks_to_boxes,
    remove_small_regions,
    stability_score,
    uncrop_boxes,
    uncrop_points,
)
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rle import encode_rle
from sam_batch.pipeline.upsampling import MaskUpsampler

UPSCALE_CHUNK = 16  # masks brought to full size at once: bounds memory, not results
Check = Callable[[], None]  # called between steps of an image's work; raises to stop it


class Engine(Protocol):
    """What `segment_crop` needs of an engine (`sam_batch.engines.torch_backend.TorchEngine` and the other back-ends).

    min_prompt_batch: the fewest prompts a decode call should carry to keep the engine's
    device busy (a GPU wants hundreds); batches are `max(points_per_batch, min_prompt_batch)`,
    which changes no mask, since every mask is filtered on its own.

    concurrent_batches: how many batches to decode at once, each on its own thread with its
    share of the caller's torch threads (the CPU point decoder keeps two cores busier across two
    batches than within one); 1 decodes them one after another.

    windowed_upscale: True where the logits are on the host and each mask is best brought to
    full size only over the window where it can pass a threshold (`pipeline.upsampling`);
    False where they stay on the engine's device and `upscale` takes a chunk at a time.
    """

    mask_threshold: float
    min_prompt_batch: int
    concurrent_batches: int
    windowed_upscale: bool

    def encode(self, crop: np.ndarray): ...

    def decode(self, crop, points: np.ndarray, min_iou: float | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def upscale(self, crop, low_res: torch.Tensor) -> torch.Tensor: ...


class DecoderOutOfMemory(RuntimeError):
    """The engine's device ran out of memory decoding `prompts` prompts in one call; fewer a
    call may fit (the masks do not depend on how prompts are batched)."""

    def __init__(self, prompts: int) -> None:
        super().__init__(f"out of device memory decoding {prompts} prompts in one call")
        self.prompts = prompts


@dataclass
class CropMasks:
    """Masks kept from one crop: on the engine's device while the crop is filtered (its
    candidates, as `segment_crop` returns them), on the host once NMS'd (`crop_survivors`);
    points always on the host.

    masks: N binary masks in crop pixels (`pipeline.held_masks`: dense on the device, or each
    as its box's pixels on the host); boxes: (N, 4) XYXY in image pixels (last pixel
    inclusive); iou, stability: (N,); points: (N, 2) xy in image pixels; crop_box: XYXY.
    """

    masks: DeviceMasks | BoxedMasks
    boxes: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    crop_box: list[int]

    def __len__(self) -> int:
        return len(self.iou)

    def select(self, index: torch.Tensor) -> CropMasks:
        """The masks at `index` (on any device), in that order."""
        return CropMasks(
            masks=self.masks.select(index),
            boxes=self.boxes[index],
            iou=self.iou[index],
            stability=self.stability[index],
            points=self.points[index.cpu()],
            crop_box=self.crop_box,
        )

    def cpu(self) -> CropMasks:
        return CropMasks(
            self.masks.cpu(), self.boxes.cpu(), self.iou.cpu(), self.stability.cpu(), self.points, self.crop_box
        )


@dataclass(frozen=True)
class Mask:
    """One mask of the final output, with its full-image bool mask."""

    mask: np.ndarray
    box: list[float]
    iou: float
    stability: float
    point: list[float]
    crop_box: list[int]


def no_check() -> None:
    """The default `check` of the functions below: no time budget."""


def generate_masks(engine: Engine, image: np.ndarray, params: AmgParams, check: Check = no_check) -> list[Mask]:
    """All masks of a uint8 (H, W, 3) image, in deterministic order.

    check: called between crops and between point batches (never before the first), raises to
    stop the image (a time budget); an image of one crop and one batch is never checked.
    """
    crops = [crop_survivors(crop, params) for crop in image_candidates(engine, image, params, check)]
    return merge_crops(crops, image.shape[:2], params)


def image_candidates(
    engine: Engine, image: np.ndarray, params: AmgParams, check: Check = no_check
) -> Iterator[CropMasks]:
    """Every crop's candidates of a uint8 (H, W, 3) image (`segment_crop`, on the engine's
    device), one `CropMasks` per crop in crop order, each made when the last is used; `check`
    as in `generate_masks`."""
    height, width = image.shape[:2]
    boxes, layers = crop_boxes(height, width, params.crop_n_layers, params.crop_overlap_ratio)
    grids = point_grids_per_layer(params.points_per_side, params.crop_n_layers, params.crop_n_points_downscale_factor)
    for index, (box, layer) in enumerate(zip(boxes, layers)):
        if index:
            check()
        yield segment_crop(engine, image, box, grids[layer], params, check)


def masks_from_candidates(crops: list[CropMasks], image_hw: tuple[int, int], params: AmgParams) -> list[Mask]:
    """The image's masks from its crops' candidates (`crop_survivors`, then `merge_crops`): the
    same masks, in the same order, as `generate_masks` at `params` when the candidates were made
    at thresholds at or below `params`' (every filter is per mask)."""
    return merge_crops([crop_survivors(crop, params) for crop in crops], image_hw, params)


def crop_survivors(crop: CropMasks, params: AmgParams) -> CropMasks:
    """A crop's candidates that pass `params`' IoU and stability thresholds (a no-op when they
    were made at them), then box NMS within the crop; on the host."""
    passing = crop.select(torch.nonzero(_passes_thresholds(crop, params))[:, 0])
    return passing.select(box_nms(passing.boxes.float(), passing.iou, params.box_nms_thresh)).cpu()


def _passes_thresholds(crop: CropMasks, params: AmgParams) -> torch.Tensor:
    """(N,) bool: the candidates `_filter_batch` keeps at `params`' IoU and stability thresholds."""
    passes = _passes_stability(crop.stability, params.stability_score_thresh)
    if params.pred_iou_thresh > 0:
        passes &= crop.iou > params.pred_iou_thresh
    return passes


def segment_crop(
    engine: Engine,
    image: np.ndarray,
    crop_box: list[int],
    grid: np.ndarray,
    params: AmgParams,
    check: Check = no_check,
) -> CropMasks:
    """Encode the crop, decode its grid in batches and filter them on the engine's device: the
    crop's candidates, in prompt order (no NMS yet).

    grid: (P, 2) points in [0, 1] over the crop; check: called before every batch but the first.
    """
    x0, y0, x1, y1 = crop_box
    height, width = image.shape[:2]
    crop = engine.encode(np.ascontiguousarray(image[y0:y1, x0:x1]))
    points = grid * np.array([[x1 - x0, y1 - y0]], dtype=np.float64)
    step = max(params.points_per_batch, engine.min_prompt_batch)
    filter_batch = partial(_filter_batch, engine, crop, crop_box=crop_box, image_hw=(height, width), params=params)
    starts = list(range(0, len(points), step))

    def checked_batch(start: int) -> CropMasks:
        if start:
            check()
        return filter_batch(points[start : start + step])

    batches = _map_in_threads(checked_batch, starts, engine.concurrent_batches)
    return CropMasks(
        masks=type(batches[0].masks).concat([b.masks for b in batches]),
        boxes=torch.cat([b.boxes for b in batches]),
        iou=torch.cat([b.iou for b in batches]),
        stability=torch.cat([b.stability for b in batches]),
        points=torch.cat([b.points for b in batches]),
        crop_box=list(crop_box),
    )


Item = TypeVar("Item")
Result = TypeVar("Result")


def _map_in_threads(function: Callable[[Item], Result], items: list[Item], threads: int) -> list[Result]:
    """`[function(item) for item in items]`, on up to `threads` threads when `threads` > 1,
    results in item order.

    The caller's torch threads are shared out among them (one each on two cores); torch's
    thread settings are per thread, so the caller's own are left as they are.
    """
    workers = min(threads, len(items))
    if workers <= 1:
        return [function(item) for item in items]
    each = max(1, torch.get_num_threads() // workers)
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(each,)) as pool:
        return list(pool.map(function, items))


def _filter_batch(
    engine: Engine,
    crop,
    points: np.ndarray,
    crop_box: list[int],
    image_hw: tuple[int, int],
    params: AmgParams,
) -> CropMasks:
    """Decode one batch of points (B, 2) in crop pixels and keep the masks that pass.

    Filters in the reference's order: predicted IoU, stability, crop edges. The IoU filter
    runs before upsampling (it does not depend on the mask), so rejected masks are never
    brought to full size. As in the reference, a threshold at or below 0 turns its filter off
    (every IoU passes, negative ones too; an empty mask's NaN stability passes).
    """
    filters_iou = params.pred_iou_thresh > 0
    try:
        low_res, iou = engine.decode(crop, points, min_iou=params.pred_iou_thresh if filters_iou else None)
    except torch.cuda.OutOfMemoryError:
        raise DecoderOutOfMemory(len(points)) from None
    n_out = low_res.shape[1]
    low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
    point_index = torch.arange(len(points), device=iou.device).repeat_interleave(n_out)

    if filters_iou:
        keep = iou > params.pred_iou_thresh
        low_res, iou, point_index = low_res[keep], iou[keep], point_index[keep]
    keep, stability, masks = _stable_masks(engine, crop, low_res, params)
    iou, point_index = iou[keep], point_index[keep]

    boxes = masks.tight_boxes()
    keep = ~box_near_crop_edge(boxes, crop_box, [0, 0, image_hw[1], image_hw[0]])
    point_xy = torch.as_tensor(points, dtype=torch.float64)[point_index[keep].cpu()]
    return CropMasks(
        masks=masks.select(torch.nonzero(keep)[:, 0]),
        boxes=uncrop_boxes(boxes[keep], crop_box),
        iou=iou[keep],
        stability=stability[keep],
        points=uncrop_points(point_xy, crop_box),
        crop_box=list(crop_box),
    )


def _stable_masks(
    engine: Engine, crop, low_res: torch.Tensor, params: AmgParams
) -> tuple[torch.Tensor, torch.Tensor, DeviceMasks | BoxedMasks]:
    """The low-res logits (K, 256, 256) whose full-size masks pass the stability filter.

    Returns their indexes (S,), stability scores (S,) and binary masks (S of the crop's size).
    With the engine's `windowed_upscale`, each mask only over the window where it can pass a
    threshold, kept as its box's pixels on the host; else `UPSCALE_CHUNK` at a time on the
    device, so full-size float masks never pile up, kept dense there.
    """
    if engine.windowed_upscale:
        return _stable_masks_windowed(
            MaskUpsampler(crop.input_hw, crop.crop_hw), low_res, engine.mask_threshold, params
        )
    return _stable_masks_batched(engine, crop, low_res, params)


def _stable_masks_batched(
    engine: Engine, crop, low_res: torch.Tensor, params: AmgParams
) -> tuple[torch.Tensor, torch.Tensor, DeviceMasks]:
    """`_stable_masks` a chunk of masks at a time, each over the whole crop."""
    kept, scores, masks = [], [], []
    for start in range(0, len(low_res), UPSCALE_CHUNK):
        logits = engine.upscale(crop, low_res[start : start + UPSCALE_CHUNK])
        stability = stability_score(logits, engine.mask_threshold, params.stability_score_offset)
        stable = _passes_stability(stability, params.stability_score_thresh)
        kept.append(torch.nonzero(stable)[:, 0] + start)
        scores.append(stability[stable])
        masks.append(logits[stable] > engine.mask_threshold)
    if not masks:
        none = torch.zeros(0, dtype=torch.int64, device=low_res.device)
        return none, torch.zeros(0, device=low_res.device), DeviceMasks.empty(crop.crop_hw, low_res.device)
    return torch.cat(kept), torch.cat(scores), DeviceMasks(torch.cat(masks))


def _stable_masks_windowed(
    upsampler: MaskUpsampler, low_res: torch.Tensor, threshold: float, params: AmgParams
) -> tuple[torch.Tensor, torch.Tensor, BoxedMasks]:
    """`_stable_masks` one mask at a time, each computed only where it can exceed threshold - offset.

    The pixel counts are numpy's (several times faster than torch's comparisons on the CPU);
    the score is `stability_score`'s: counts exact in float32, one rounded division.
    """
    offset, filters = params.stability_score_offset, params.stability_score_thresh > 0
    upper, lower, binary = (np.float32(threshold + offset), np.float32(threshold - offset), np.float32(threshold))
    kept, scores, windows = [], [], []
    for index, logits in enumerate(low_res):
        found = upsampler.logits_above(logits, threshold - offset)
        if found is None:  # no pixel above the lower threshold (offset >= 0): an empty mask, 0 / 0
            if not filters:
                kept.append(index)
                scores.append(np.float32(np.nan))
                windows.append(None)
            continue
        window, full = found
        values = full.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 when no pixel passes: NaN
            stability = np.float32(np.count_nonzero(values > upper)) / np.float32(np.count_nonzero(values > lower))
        if not filters or stability >= params.stability_score_thresh:
            kept.append(index)
            scores.append(stability)
            windows.append((window.rows[0], window.cols[0], values > binary))
    masks = BoxedMasks.from_windows(upsampler.crop_hw, windows)
    return torch.tensor(kept, dtype=torch.int64), torch.from_numpy(np.array(scores, dtype=np.float32)), masks


def _passes_stability(stability: torch.Tensor, threshold: float) -> torch.Tensor:
    """(K,) bool: stability >= threshold; all True when threshold <= 0 (the reference's filter is
    off then, so NaN scores of empty masks pass too)."""
    if threshold <= 0:
        return torch.ones_like(stability, dtype=torch.bool)
    return stability >= threshold


def merge_crops(crops: list[CropMasks], image_hw: tuple[int, int], params: AmgParams) -> list[Mask]:
    """NMS across crops (scored by 1 / crop area), then the optional small-region cleanup."""
    height, width = image_hw
    candidates = [(crop, i) for crop in crops for i in range(len(crop))]
    if not candidates:
        return []
    if len(crops) > 1:
        boxes = torch.cat([crop.boxes for crop in crops]).float()
        areas = torch.tensor(
            [float((c.crop_box[2] - c.crop_box[0]) * (c.crop_box[3] - c.crop_box[1])) for c, _ in candidates]
        )
        order = box_nms(boxes, 1.0 / areas, params.crop_nms_thresh)
        candidates = [candidates[i] for i in order.tolist()]
    masks = [_to_full_mask(crop, i, height, width) for crop, i in candidates]
    if params.min_mask_region_area > 0:
        masks = _remove_small_regions(masks, params)
    return masks


def _to_full_mask(crop: CropMasks, i: int, height: int, width: int) -> Mask:
    """Mask `i` of `crop` over the whole image (a view of the crop's mask where the crop is the
    image, so a large photo's masks are not held twice)."""
    x0, y0, x1, y1 = crop.crop_box
    if (y1 - y0, x1 - x0) == (height, width):
        full = crop.masks.full(i)
    else:
        full = np.zeros((height, width), dtype=bool)
        full[y0:y1, x0:x1] = crop.masks.full(i)
    return Mask(
        mask=full,
        box=[float(v) for v in crop.boxes[i].tolist()],
        iou=float(crop.iou[i]),
        stability=float(crop.stability[i]),
        point=[float(v) for v in crop.points[i].tolist()],
        crop_box=list(crop.crop_box),
    )


def _remove_small_regions(masks: list[Mask], params: AmgParams) -> list[Mask]:
    """Fill small holes, drop small islands; changed masks score 0, so NMS prefers unchanged ones."""
    cleaned: list[Mask] = []
    scores: list[float] = []
    for m in masks:
        mask, holes_changed = remove_small_regions(m.mask, params.min_mask_region_area, "holes")
        mask, islands_changed = remove_small_regions(mask, params.min_mask_region_area, "islands")
        changed = holes_changed or islands_changed
        box = masks_to_boxes(torch.from_numpy(mask)[None])[0] if changed else torch.tensor(m.box)
        cleaned.append(Mask(mask, [float(v) for v in box.tolist()], m.iou, m.stability, m.point, m.crop_box))
        scores.append(0.0 if changed else 1.0)
    boxes = torch.tensor([m.box for m in cleaned], dtype=torch.float32)
    order = box_nms(boxes, torch.tensor(scores), max(params.box_nms_thresh, params.crop_nms_thresh))
    return [cleaned[i] for i in order.tolist()]


def to_records(masks: list[Mask]) -> list[dict]:
    """The reference's `coco_rle` records, one per mask, in mask order.

    bbox is XYWH with W = x1 - x0 (x1 the last pixel), as the reference writes it.
    """
    records = []
    for m in masks:
        x0, y0, x1, y1 = m.box
        cx0, cy0, cx1, cy1 = m.crop_box
        rle = encode_rle(m.mask)
        records.append(
            {
                "segmentation": rle,
                "area": int(m.mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": m.iou,
                "point_coords": [m.point],
                "stability_score": m.stability,
                "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
            }
        )
    return records
