"""The parameters of automatic mask generation (no torch here: the job schema builds on them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AmgParams:
    """The parameters of SamAutomaticMaskGenerator, with its names and defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
