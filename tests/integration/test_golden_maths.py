"""The AMG maths (grids, masks, RLE, NMS, cleanup) against the golden outputs: MobileSAM's own
SamAutomaticMaskGenerator records (fp32 CPU, coco_rle) in ../shared/golden."""

import functools
import json

import numpy as np
import pytest
import torch

from sam_batch.pipeline import grids, masks, rle
from shared_data import GOLDEN

DEFAULT_CROP_OVERLAP = 512 / 1500  # the reference's crop_overlap_ratio
GOLDEN_FILES = sorted(p.name for p in GOLDEN.glob("*.json"))


needs_golden = pytest.mark.skipif(not GOLDEN_FILES, reason=f"no golden files in {GOLDEN}")


@functools.cache
def golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


@functools.cache
def golden_masks(name: str) -> np.ndarray:
    """(N, H, W) bool decoded masks of a golden file."""
    return np.stack([rle.decode_rle(r["segmentation"]) for r in golden(name)["masks"]])


def xywh_to_xyxy(box: list[int]) -> list[int]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def golden_boxes_xyxy(name: str) -> torch.Tensor:
    """Golden bboxes as (N, 4) float XYXY, x1/y1 inclusive, as the reference's NMS sees them."""
    return torch.tensor([xywh_to_xyxy(r["bbox"]) for r in golden(name)["masks"]]).float()


@needs_golden
def test_crop_boxes_match_golden_truck():
    name = "truck.jpg.pps16.crop1.minarea0.json"
    height, width, _ = golden(name)["shape"]
    boxes, _ = grids.crop_boxes(height, width, 1, DEFAULT_CROP_OVERLAP)
    used = {tuple(xywh_to_xyxy(r["crop_box"])) for r in golden(name)["masks"]}
    assert used == {tuple(b) for b in boxes}


@needs_golden
@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_points_lie_on_the_crop_grid(name):
    data = golden(name)
    n = data["params"]["points_per_side"]  # the golden runs use downscale factor 1
    for record in data["masks"]:
        x0, y0, w, h = record["crop_box"]
        candidates = grids.point_grid(n) * [w, h] + [x0, y0]
        assert (candidates == record["point_coords"][0]).all(axis=1).any()


@needs_golden
@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_rle_bbox_area(name):
    records = golden(name)["masks"]
    decoded = golden_masks(name)
    assert decoded.shape[1:] == tuple(golden(name)["shape"][:2])
    assert rle.encode_rle_batch(decoded) == [r["segmentation"] for r in records]
    boxes = masks.masks_to_boxes(torch.from_numpy(decoded))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    assert xywh.tolist() == [r["bbox"] for r in records]
    assert decoded.sum(axis=(1, 2)).tolist() == [r["area"] for r in records]
    assert [rle.rle_area(r["segmentation"]) for r in records] == [r["area"] for r in records]


@needs_golden
@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_boxes_are_not_near_crop_edges(name):
    height, width, _ = golden(name)["shape"]
    for record, box in zip(golden(name)["masks"], golden_boxes_xyxy(name)):
        crop = xywh_to_xyxy(record["crop_box"])
        in_crop = box - torch.tensor(crop[:2] * 2)
        assert not masks.box_near_crop_edge(in_crop[None], crop, [0, 0, width, height]).any()


@needs_golden
@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_boxes_survive_nms_in_order(name):
    """Golden records are NMS survivors, listed in the order NMS returns them."""
    records = golden(name)["masks"]
    boxes = golden_boxes_xyxy(name)
    scores = torch.tensor([r["predicted_iou"] for r in records])
    if golden(name)["params"]["crop_n_layers"] > 0:
        # The final NMS across crops scores each mask by 1 / area of its crop.
        scores = 1 / torch.tensor([r["crop_box"][2] * r["crop_box"][3] for r in records])
    if golden(name)["params"]["min_mask_region_area"] == 0:
        assert masks.box_nms(boxes, scores, 0.7).tolist() == list(range(len(records)))
    else:
        assert len(masks.box_nms(boxes, scores, 0.7)) == len(records)


@needs_golden
def test_golden_min_area_postprocessing_is_reproduced():
    """dog.jpg at min_mask_region_area=100 follows from its min_mask_region_area=0 output.

    Per mask: fill small holes, then remove small islands (score 0 if either changed the
    mask, else 1); NMS on the new boxes at 0.7; changed survivors get a new RLE and box.
    """
    before = golden("dog.jpg.pps32.crop0.minarea0.json")["masks"]
    after = golden("dog.jpg.pps32.crop0.minarea100.json")["masks"]
    cleaned, scores = [], []
    for mask in golden_masks("dog.jpg.pps32.crop0.minarea0.json"):
        mask, filled = masks.remove_small_regions(mask, 100, "holes")
        mask, removed = masks.remove_small_regions(mask, 100, "islands")
        cleaned.append(mask)
        scores.append(0.0 if filled or removed else 1.0)
    boxes = masks.masks_to_boxes(torch.from_numpy(np.stack(cleaned)))
    keep = masks.box_nms(boxes.float(), torch.tensor(scores), 0.7)

    expected = [(r["segmentation"], r["bbox"], r["predicted_iou"]) for r in after]
    produced = []
    for i in keep.tolist():
        segmentation, bbox = before[i]["segmentation"], before[i]["bbox"]
        if scores[i] == 0.0:
            x0, y0, x1, y1 = boxes[i].tolist()
            segmentation, bbox = rle.encode_rle(cleaned[i]), [x0, y0, x1 - x0, y1 - y0]
        produced.append((segmentation, bbox, before[i]["predicted_iou"]))
    assert produced == expected
