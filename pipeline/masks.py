"""Mask maths of automatic mask generation: scoring, boxes, crop geometry, NMS, cleanup.

Torch functions run on whichever device their tensors are on. Boxes are XYXY; boxes
computed from masks are inclusive (x1, y1 are the last set pixel), crop boxes are
exclusive at x1/y1 (see :mod:`.grids`).
"""

from typing import Literal

import numpy as np
import torch
from torch import Tensor


def stability_score(logits: Tensor, mask_threshold: float, offset: float) -> Tensor:
    """Stability of each mask under shifting the binarisation threshold.

    ``|logits > mask_threshold + offset| / |logits > mask_threshold - offset|``, counted
    per mask in int16 along rows then int32, so no (N, H, W) integer tensor is formed.

    Args:
        logits: (N, H, W) float mask logits.
        mask_threshold: binarisation threshold (0.0 for SAM).
        offset: threshold shift (1.0 in the reference generator).

    Returns:
        (N,) float32 scores in [0, 1]; NaN where no pixel exceeds the lower threshold.
    """
    row_dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32

    def count(threshold: float) -> Tensor:
        return (logits > threshold).sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int32)

    return count(mask_threshold + offset) / count(mask_threshold - offset)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight bounding boxes of binary masks.

    Args:
        masks: (N, H, W) bool masks.

    Returns:
        (N, 4) int64 XYXY boxes with x1, y1 the index of the last set column/row
        (inclusive); [0, 0, 0, 0] for empty masks.
    """

    def first_last(occupied: Tensor) -> tuple[Tensor, Tensor]:
        size = occupied.shape[-1]
        index = torch.arange(size, device=occupied.device)
        first = torch.where(occupied, index, size).amin(-1)
        last = torch.where(occupied, index, -1).amax(-1)
        return first, last

    as_bytes = masks.view(torch.uint8)  # amax over bytes is several times faster than any()
    x0, x1 = first_last(as_bytes.amax(-2) > 0)
    y0, y1 = first_last(as_bytes.amax(-1) > 0)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    empty = x1 < 0
    return boxes.masked_fill(empty[..., None], 0)


def uncrop_boxes(boxes: Tensor, crop_box: list[int]) -> Tensor:
    """Move (N, 4) XYXY boxes from a crop's frame to the image frame (adds x0, y0)."""
    x0, y0 = crop_box[:2]
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device)
    return boxes + offset


def uncrop_points(points: Tensor, crop_box: list[int]) -> Tensor:
    """Move (N, 2) xy points from a crop's frame to the image frame (adds x0, y0)."""
    offset = torch.tensor(crop_box[:2], device=points.device)
    return points + offset


def box_near_crop_edge(boxes: Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0) -> Tensor:
    """Which boxes touch a crop edge that is not also an edge of the image.

    Args:
        boxes: (N, 4) XYXY boxes in the crop's frame, pixels.
        crop_box: the crop, XYXY in image pixels.
        orig_box: the whole image, [0, 0, W, H].
        atol: distance in pixels within which a box side counts as on an edge.

    Returns:
        (N,) bool, True where some side of the box (in image pixels) is within ``atol`` of
        the matching crop side while not within ``atol`` of the matching image side.
    """
    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor(orig_box, dtype=torch.float32, device=boxes.device)
    boxes = uncrop_boxes(boxes, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


# torchvision's CPU `batched_nms` keeps its first path up to this many boxes (4,000 coordinates);
# above it, it re-sorts the kept boxes by score with an unstable sort, which reorders ties
TORCHVISION_RESORT_ABOVE = 1000
NMS_ROWS_AT_ONCE = 1024  # IoU rows compared at once: NMS holds a few (this many, N) arrays


def box_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, as torchvision's CPU ``batched_nms`` with one category.

    Boxes are visited by descending score; each kept box suppresses every later box whose
    IoU with it exceeds ``iou_threshold``. IoU treats coordinates as continuous, area =
    (x1 - x0) * (y1 - y0), in the boxes' float dtype, compared against the threshold as a
    double.

    Tie order follows torchvision's CPU code path for the number of boxes: up to
    `TORCHVISION_RESORT_ABOVE` boxes, equal scores keep their input order (its NMS kernel sorts
    stably); above it, the kept boxes are put in index order and sorted again by
    ``torch.sort(descending=True)``, unstable, as torchvision does, so ties come out in that
    sort's order. Both are checked against torchvision's own output (tests/data). The reference
    on a GPU switches paths at another count and sorts ties in its own order.

    Memory: a few `NMS_ROWS_AT_ONCE` x N arrays at a time, linear in N however many boxes.

    Args:
        boxes: (N, 4) float XYXY boxes.
        scores: (N,) scores, same dtype as boxes.
        iou_threshold: IoU above which the lower-scored box is suppressed.

    Returns:
        int64 indexes of kept boxes, on boxes' device, by descending score.
    """
    scores = scores.cpu()
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = order[_greedy_survivors(boxes[order.to(boxes.device)], iou_threshold)]
    if len(boxes) > TORCHVISION_RESORT_ABOVE:
        kept = kept.sort().values
        kept = kept[torch.sort(scores[kept], descending=True).indices]
    return kept.to(boxes.device)


def _greedy_survivors(boxes: Tensor, iou_threshold: float) -> list[int]:
    """Positions of the boxes (N, 4) XYXY, sorted by descending score, that no earlier kept
    box overlaps by more than ``iou_threshold``; IoUs `NMS_ROWS_AT_ONCE` rows at a time."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    area = (x1 - x0) * (y1 - y0)
    threshold = _float_below_or_at(iou_threshold, boxes.dtype)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept: list[int] = []
    for start in range(0, len(boxes), NMS_ROWS_AT_ONCE):
        rows, later = slice(start, start + NMS_ROWS_AT_ONCE), slice(start, None)
        width = (torch.minimum(x1[rows, None], x1[later]) - torch.maximum(x0[rows, None], x0[later])).clamp(min=0)
        height = (torch.minimum(y1[rows, None], y1[later]) - torch.maximum(y0[rows, None], y0[later])).clamp(min=0)
        inter = width * height
        overlaps = (inter / (area[rows, None] + area[later] - inter) > threshold).cpu().numpy()
        for row, overlap in enumerate(overlaps):
            if not suppressed[start + row]:
                kept.append(start + row)
                suppressed[start:] |= overlap
    return kept


def _float_below_or_at(threshold: float, dtype: torch.dtype) -> float:
    """Largest value of ``dtype`` that is <= ``threshold``.

    For x of that dtype, ``x > threshold`` (exact, in double) equals ``x > result``, whatever
    precision torch compares a tensor against a Python scalar in.
    """
    if dtype != torch.float32:
        return threshold
    rounded = np.float32(threshold)
    if float(rounded) > threshold:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill small holes in, or remove small islands from, a binary mask.

    Regions are 8-connected components: of the mask for "islands", of its complement for
    "holes" (so a small background area touching the border counts as a hole). Regions
    with fewer than ``area_thresh`` pixels are filled ("holes") or removed ("islands"); if
    removing islands would remove every region, the largest one is kept instead (among
    equals, the one the reference's OpenCV labelling numbers first).

    Args:
        mask: (H, W) bool mask.
        area_thresh: region size in pixels below which a region is small.
        mode: "holes" or "islands".

    Returns:
        (mask, changed): the cleaned (H, W) bool mask (the input itself when unchanged) and
        whether any small region was found (True also when keeping the largest island
        leaves the mask as it was).
    """
    from scipy import ndimage  # slow to import: only jobs with amg.min_mask_region_area > 0 pay it

    fill_holes = mode == "holes"
    labels, n_regions = ndimage.label(mask != fill_holes, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if fill_holes:
        # Label 0 is the mask itself; the small holes join it.
        in_result = np.concatenate([[True], small])
    else:
        in_result = np.concatenate([[False], ~small])
        if not in_result.any():
            in_result[_first_largest_label(labels, sizes)] = True
    return in_result[labels], True


def _first_largest_label(labels: np.ndarray, sizes: np.ndarray) -> int:
    """Label of the largest region; among equals, the one OpenCV numbers first.

    OpenCV's default 8-connectivity labelling scans 2x2 pixel blocks in raster order and
    numbers regions by their first block (all pixels of a block are 8-connected).

    Args:
        labels: (H, W) int labels, 0 for background, regions 1..len(sizes).
        sizes: (n_regions,) pixel count of each region.
    """
    from scipy import ndimage

    largest = np.flatnonzero(sizes == sizes.max()) + 1
    rows, cols = np.indices(labels.shape)
    block = (rows // 2) * labels.shape[1] + cols // 2
    first_blocks = ndimage.minimum(block, labels, index=largest)
    return int(largest[np.argmin(first_blocks)])
