"""The parameters of automatic mask generation (no torch here: the job schema builds on them)."""

from __future__ import annotations

from dataclasses import dataclass, replace


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


# `output.candidates` keeps every candidate mask (before NMS) whose predicted IoU is above
# CANDIDATE_MIN_IOU and whose stability score is at least CANDIDATE_MIN_STABILITY: the floor at
# or above which `sam-batch refilter` may set the two thresholds. Half of each keeps the
# candidates a user plausibly re-thresholds to (the reference's defaults are 0.88 and 0.95,
# SAM 2's 0.8 and 0.95) without storing the masks SAM itself rates as poor.
CANDIDATE_MIN_IOU = 0.5
CANDIDATE_MIN_STABILITY = 0.5
# the parameters `sam-batch refilter` may change: none of them is seen by the model
MODEL_FREE_PARAMS = (
    "pred_iou_thresh",
    "stability_score_thresh",
    "box_nms_thresh",
    "crop_nms_thresh",
    "min_mask_region_area",
)


def candidate_floor(params: AmgParams) -> AmgParams:
    """`params` with the IoU and stability thresholds at the candidates' floor."""
    return replace(params, pred_iou_thresh=CANDIDATE_MIN_IOU, stability_score_thresh=CANDIDATE_MIN_STABILITY)


def below_floor(
    params: AmgParams, min_iou: float = CANDIDATE_MIN_IOU, min_stability: float = CANDIDATE_MIN_STABILITY
) -> list[str]:
    """The thresholds of `params` below a floor (by default this version's; an output's own is
    in its candidates files, `tables.FLOOR_KEY`), as 'name value < floor'."""
    found = []
    if params.pred_iou_thresh < min_iou:
        found.append(f"amg.pred_iou_thresh {params.pred_iou_thresh} < {min_iou}")
    if params.stability_score_thresh < min_stability:
        found.append(f"amg.stability_score_thresh {params.stability_score_thresh} < {min_stability}")
    return found
