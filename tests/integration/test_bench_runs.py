"""The benchmarks' real sides on the real photos: `sam-batch run` timed and read back by
`benchmarks.reference`, and `benchmarks.image_stages` on one image."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.reference import (
    run_pipeline,
)


def test_run_pipeline_times_sam_batch_run_and_reads_its_masks(tmp_path: Path, shared_images: Path) -> None:
    """The whole-process side for real: `sam-batch run` on two images (a 2x2 grid), its masks
    read back per image as the URIs were given (relative ones included)."""
    from shared_data import MOBILE_SAM

    images = [str(shared_images / "dog.jpg"), os.path.relpath(shared_images / "truck.jpg")]
    lines: list[str] = []
    records, seconds = run_pipeline(
        images, tmp_path, model_type="vit_t", checkpoint=MOBILE_SAM, points_per_side=2, log=lines.append
    )
    assert seconds > 0 and set(records) == set(images)
    assert all(records[uri] for uri in images)
    assert all(set(r) == {"segmentation"} and r["segmentation"]["size"] for uri in images for r in records[uri])
    assert any("images: 2 ok, 0 error" in line for line in lines)


def test_profile_times_every_stage_of_one_image(shared_images: Path) -> None:
    from benchmarks.image_stages import STAGES, profile_image
    from sam_batch.pipeline import amg, held_masks

    before = {name: getattr(amg, name) for name in ("_stable_masks", "box_nms", "encode_rle")}
    boxes_before = held_masks.masks_to_boxes
    result = profile_image(str(shared_images / "truck.jpg"), threads=1, points_per_side=4)
    assert result["masks"] > 0 and result["threads"] == 1
    assert set(STAGES) <= set(result) and result["generate"] >= result["decode"] > 0
    assert all(getattr(amg, name) is f for name, f in before.items())  # unwrapped again
    assert held_masks.masks_to_boxes is boxes_before
