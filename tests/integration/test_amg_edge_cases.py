"""The reference generator's edge cases.

Filters at or below 0 are off: `pred_iou_thresh <= 0` keeps every predicted IoU, negative ones
too, and `stability_score_thresh <= 0` keeps every mask, empty ones (stability 0 / 0 = NaN) too;
any positive threshold drops both. Checked with an engine whose logits are made by hand, through
both ways of bringing masks to full size. A 1 x 1 image gets the reference's recorded masks.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from parity import strict_differences
from sam_batch.engines.backend import CropEmbedding, upscale_logits
from sam_batch.engines.factory import build_engine
from sam_batch.pipeline.amg import _filter_batch, generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rasters import ArrayScene
from sam_batch.pipeline.scenes import segment_scene
from shared_data import IMAGES, MOBILE_SAM, TEST_DATA

SIDE = 64  # the image is SIDE x SIDE pixels, so its input frame is 1024 x 1024


class HandMadeEngine:
    """Every prompt's three masks: empty (IoU 0.95), a square in the middle (IoU -0.2) and a
    larger square (IoU 0.95); logits +-8, so the squares are perfectly stable."""

    mask_threshold, min_prompt_batch, concurrent_batches = 0.0, 1, 1

    def __init__(self, windowed_upscale: bool) -> None:
        self.windowed_upscale = windowed_upscale

    def encode(self, crop: np.ndarray) -> CropEmbedding:
        return CropEmbedding(torch.zeros(1), (1024, 1024), crop.shape[:2])

    def decode(self, crop, points, min_iou=None):
        logits = torch.full((len(points), 3, 256, 256), -8.0)
        logits[:, 1, 96:160, 96:160] = 8.0
        logits[:, 2, 64:192, 64:192] = 8.0
        iou = torch.tensor([[0.95, -0.2, 0.95]]).repeat(len(points), 1)
        return logits, iou

    def upscale(self, crop, low_res):
        return upscale_logits(crop, low_res)


def records(windowed: bool, **thresholds) -> list[dict]:
    params = AmgParams(points_per_side=1, box_nms_thresh=0.99, **thresholds)
    return to_records(generate_masks(HandMadeEngine(windowed), np.zeros((SIDE, SIDE, 3), np.uint8), params))


@pytest.mark.parametrize("windowed", [True, False])
def test_thresholds_at_zero_turn_their_filters_off(windowed: bool) -> None:
    kept = records(windowed, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert sorted(r["area"] for r in kept) == [0, 16 * 16, 32 * 32]
    empty = next(r for r in kept if r["area"] == 0)
    assert math.isnan(empty["stability_score"]) and empty["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert next(r for r in kept if r["area"] == 256)["predicted_iou"] == pytest.approx(-0.2)


@pytest.mark.parametrize("windowed", [True, False])
def test_positive_thresholds_drop_negative_ious_and_empty_masks(windowed: bool) -> None:
    assert sorted(r["area"] for r in records(windowed, pred_iou_thresh=1e-6, stability_score_thresh=0.0)) == [0, 1024]
    assert sorted(r["area"] for r in records(windowed, pred_iou_thresh=0.0, stability_score_thresh=1e-6)) == [256, 1024]
    assert [r["area"] for r in records(windowed)] == [1024]


def test_an_empty_mask_is_a_row_of_a_scene() -> None:
    params = AmgParams(points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.99)
    scene = segment_scene(HandMadeEngine(True), ArrayScene(np.zeros((SIDE, SIDE, 3), np.uint8)), params, 1024, 128)
    rows = scene.records()
    assert sorted(r["area"] for r in rows) == [0, 256, 1024]
    assert all(r["segmentation"]["size"] == [SIDE, SIDE] for r in rows)
    tiled = segment_scene(HandMadeEngine(True), ArrayScene(np.zeros((SIDE, 2 * SIDE, 3), np.uint8)), params, 96, 16)
    assert tiled.tiles == 2 and tiled.masks and all(m.area > 0 for m in tiled.masks)  # no place to stand: dropped


def test_a_one_pixel_image_gives_the_references_masks() -> None:
    """The reference gives a 1 x 1 image 32 masks at 4 x 4 points, all the one pixel, box
    [0, 0, 0, 0]: NMS never suppresses a zero-area box (its IoU is 0 / 0). Ours are the same."""
    reference = json.loads((TEST_DATA / "one_pixel.json").read_text())
    image = np.full(reference["shape"], reference["gray"], np.uint8)
    engine = build_engine("vit_t", str(MOBILE_SAM), device="cpu")
    ours = to_records(generate_masks(engine, image, AmgParams(**reference["params"])))
    assert len(reference["masks"]) == 32
    assert not strict_differences(ours, reference["masks"])


def test_thresholds_at_zero_keep_every_mask_of_the_real_point_decoder() -> None:
    """The CPU point decoder asked for no IoU floor decodes every prompt's three masks, and with
    both filters off all of them reach NMS."""
    engine = build_engine("vit_t", str(MOBILE_SAM), device="cpu")
    image = load_image(str(IMAGES / "dog.jpg"))
    crop = engine.encode(image)
    points = np.array([[100.0, 100.0], [400.0, 260.0], [700.0, 500.0], [5.0, 5.0]])
    image_box = [0, 0, image.shape[1], image.shape[0]]
    off = AmgParams(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    kept = _filter_batch(engine, crop, points, image_box, image.shape[:2], off)
    assert len(kept) == 3 * len(points)
    assert len(_filter_batch(engine, crop, points, image_box, image.shape[:2], AmgParams())) < len(kept)


class EmptyEngine(HandMadeEngine):
    """Every prompt's three masks empty."""

    def decode(self, crop, points, min_iou=None):
        return torch.full((len(points), 3, 256, 256), -8.0), torch.full((len(points), 3), 0.95)


def test_crop_layers_with_no_mask_at_all_give_no_masks() -> None:
    """Where the reference raises (it concatenates no crop's data), sam-batch returns none."""
    params = AmgParams(points_per_side=2, crop_n_layers=1)
    assert generate_masks(EmptyEngine(True), np.zeros((SIDE, SIDE, 3), np.uint8), params) == []


class Steps:
    """A `check` that counts its calls and raises at the call numbered `stop_at` (1-based)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.stop_at:
            raise TimeoutError("over budget")


def test_the_check_runs_between_tiles_crops_and_batches_only() -> None:
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    one_step = Steps()
    generate_masks(HandMadeEngine(True), image, AmgParams(points_per_side=2), one_step)
    assert one_step.calls == 0  # one crop, one batch: nothing to check between
    batches = Steps()
    generate_masks(HandMadeEngine(True), image, AmgParams(points_per_side=2, points_per_batch=1), batches)
    assert batches.calls == 3  # four batches of one point
    crops = Steps()
    generate_masks(HandMadeEngine(True), image, AmgParams(points_per_side=2, crop_n_layers=1), crops)
    assert crops.calls == 4  # five crops, one batch each
    tiles = Steps()
    scene = segment_scene(
        HandMadeEngine(True),
        ArrayScene(np.zeros((SIDE, 2 * SIDE, 3), np.uint8)),
        AmgParams(points_per_side=2),
        96,
        16,
        tiles,
    )
    assert (scene.tiles, tiles.calls) == (2, 1)


def test_a_check_that_raises_stops_the_image() -> None:
    params = AmgParams(points_per_side=2, points_per_batch=1)
    with pytest.raises(TimeoutError, match="over budget"):
        generate_masks(HandMadeEngine(True), np.zeros((SIDE, SIDE, 3), np.uint8), params, Steps(stop_at=2))
