"""Candidates and `sam-batch refilter` without a model: rows and back, the job refilter builds,
and what it refuses (tests/integration/test_refilter.py holds it to `sam-batch run`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.job_rules import JobError
from sam_batch.jobs.plan import Plan, Shard
from sam_batch.jobs.refilter import RefilterError, refilter, refilter_job
from sam_batch.pipeline.amg import CropMasks, masks_from_candidates
from sam_batch.pipeline.candidates import crop_row, crops_from_rows
from sam_batch.pipeline.held_masks import BoxedMasks
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.rle import decode_rle
from sam_batch.pipeline.tables import (
    FLOOR_KEY,
    candidate_rows,
    candidates_table,
    image_row,
    images_table,
    masks_table,
)


def random_crop(seed: int, crop_box: list[int], n: int = 12) -> CropMasks:
    """`n` candidates of blobs in a crop at `crop_box` (XYXY), held as `BoxedMasks`."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = crop_box
    hw = (y1 - y0, x1 - x0)
    windows = []
    for _ in range(n):
        top, left = int(rng.integers(0, hw[0] - 8)), int(rng.integers(0, hw[1] - 8))
        windows.append((top, left, rng.random((8, 8)) > 0.4))
    masks = BoxedMasks.from_windows(hw, windows)
    return CropMasks(
        masks=masks,
        boxes=masks.tight_boxes() + torch.tensor([x0, y0, x0, y0]),
        iou=torch.tensor(rng.uniform(0.5, 1.0, n), dtype=torch.float32),
        stability=torch.tensor(rng.uniform(0.5, 1.0, n), dtype=torch.float32),
        points=torch.tensor(rng.uniform(0, 30, (n, 2)), dtype=torch.float64) + torch.tensor([x0, y0]),
        crop_box=crop_box,
    )


def test_candidates_come_back_from_their_rows_as_they_were() -> None:
    crops = [random_crop(0, [0, 0, 40, 30]), random_crop(1, [10, 5, 40, 30], n=0), random_crop(2, [12, 0, 40, 24])]
    rows = [crop_row(crop, index, 0, 1, None) for index, crop in enumerate(crops)]
    read_back = candidates_table(candidate_rows("/a.jpg", rows[::-1])).to_pylist()  # through Arrow, any order
    for crop, again in zip(crops, crops_from_rows(read_back)):
        assert again.crop_box == crop.crop_box and len(again) == len(crop)
        assert torch.equal(again.boxes, crop.boxes) and torch.equal(again.points, crop.points)
        assert torch.equal(again.iou, crop.iou) and torch.equal(again.stability, crop.stability)
        assert all(np.array_equal(again.masks.full(i), crop.masks.full(i)) for i in range(len(crop)))


def test_masks_from_candidates_filter_at_the_thresholds_they_are_given() -> None:
    crops = [random_crop(3, [0, 0, 40, 30], n=30)]
    low, high = AmgParams(pred_iou_thresh=0.5, stability_score_thresh=0.5), AmgParams(pred_iou_thresh=0.8)
    kept = masks_from_candidates(crops, (30, 40), high)
    assert 0 < len(kept) < len(masks_from_candidates(crops, (30, 40), low))
    assert all(m.iou > 0.8 and m.stability >= high.stability_score_thresh for m in kept)


def source_plan(tmp_path, model_type: str = "vit_t", **amg) -> Plan:
    """The plan of a job keeping candidates of one photo with `model_type` and `amg` set."""
    job = parse_job(
        {
            "name": "photos",
            "input": {"uris": [str(tmp_path / "a.jpg")]},
            "model": {"type": model_type},
            "amg": {"points_per_side": 8, **amg},
            "output": {"uri": str(tmp_path / "out"), "candidates": True},
            "run": {"executor": "local", "shard_size": 7},
        }
    )
    return Plan(job.fingerprint(), job.redacted_dict(), (Shard(0, (str(tmp_path / "a.jpg"),)),), "EPSG:4326")


def test_the_refilter_job_is_the_run_job_at_the_new_settings(tmp_path) -> None:
    plan = source_plan(tmp_path)
    job = refilter_job(plan, ["amg.box_nms_thresh=0.5", "amg.min_mask_region_area=100"], str(tmp_path / "new"))
    run = parse_job(
        {
            "name": "photos",
            "input": {"uris": [str(tmp_path / "a.jpg")]},
            "amg": {"points_per_side": 8, "box_nms_thresh": 0.5, "min_mask_region_area": 100},
            "output": {"uri": str(tmp_path / "elsewhere")},
        }
    )
    assert job.fingerprint() == run.fingerprint() and job.output.uri == str(tmp_path / "new")
    assert not job.output.candidates and job.run.executor == "auto"
    assert refilter_job(plan, ["run.executor=ray"], str(tmp_path / "new")).run.executor == "ray"


@pytest.mark.parametrize(
    "override, says",
    [
        ("amg.bogus=1", "unknown key"),
        ("amg.points_per_side=16", "needs the model"),
        ("amg.stability_score_offset=0.5", "needs the model"),
        ("engine.precision=fp16", "needs the model"),
        ("amg.pred_iou_thresh", "expects KEY=VALUE"),
        ("amg.pred_iou_thresh=0.49", "amg.pred_iou_thresh 0.49 < 0.5"),
    ],
)
def test_refilter_refuses_what_needs_the_model_or_lies_below_the_floor(tmp_path, override, says) -> None:
    with pytest.raises(RefilterError, match=says):
        refilter_job(source_plan(tmp_path), [override], str(tmp_path / "new"))


def test_refilter_checks_values_as_the_job_file_does(tmp_path) -> None:
    with pytest.raises(JobError, match="amg.box_nms_thresh"):
        refilter_job(source_plan(tmp_path), ["amg.box_nms_thresh=2"], str(tmp_path / "new"))
    with pytest.raises(RefilterError, match="must not be the source"):
        refilter_job(source_plan(tmp_path), [], str(tmp_path / "out"))


def test_a_sam2_output_refilters_below_its_generators_default_down_to_the_floor(tmp_path) -> None:
    """SAM 2.1's pred_iou_thresh is 0.8 by default and its candidates are kept from 0.5: lowered
    to 0.6 it is the run job at 0.6; null is SAM 2's default again (not SAM's 0.88); 0.45 is
    under the floor."""
    plan = source_plan(tmp_path, "sam2.1_hiera_t")
    assert plan.job["amg"]["pred_iou_thresh"] == 0.8
    job = refilter_job(plan, ["amg.pred_iou_thresh=0.6"], str(tmp_path / "new"))
    run = parse_job(
        {
            "name": "photos",
            "input": {"uris": [str(tmp_path / "a.jpg")]},
            "model": {"type": "sam2.1_hiera_t"},
            "amg": {"points_per_side": 8, "pred_iou_thresh": 0.6},
            "output": {"uri": str(tmp_path / "elsewhere")},
        }
    )
    assert job.fingerprint() == run.fingerprint() and job.amg == run.amg
    assert refilter_job(plan, ["amg.pred_iou_thresh=null"], str(tmp_path / "new")).amg.pred_iou_thresh == 0.8
    with pytest.raises(RefilterError, match=r"amg.pred_iou_thresh 0.45 < 0.5"):
        refilter_job(plan, ["amg.pred_iou_thresh=0.45"], str(tmp_path / "new"))


@pytest.mark.parametrize("override", ["amg.multimask_output=false", "amg.use_m2m=true", "amg.mask_threshold=0.5"])
def test_refilter_refuses_sam2s_generator_keys_in_one_line(tmp_path, override) -> None:
    """SAM 2's three generator keys change what the model decodes or how its logits are cut."""
    with pytest.raises(RefilterError) as error:
        refilter_job(source_plan(tmp_path, "sam2.1_hiera_t"), [override], str(tmp_path / "new"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--set {override}: needs the model; refilter changes only amg.pred_iou_thresh, ")


def test_a_job_keeping_candidates_may_not_threshold_below_the_floor(tmp_path) -> None:
    with pytest.raises(JobError, match=r"output\.candidates: .*amg\.pred_iou_thresh 0\.3 < 0\.5"):
        source_plan(tmp_path, pred_iou_thresh=0.3)


def committed_source(tmp_path, tile_row: dict, floor: bytes | None = None) -> str:
    """A sam-batch output of one photo whose one shard holds `tile_row` as its candidates (and,
    given, `floor` as their files' floor metadata)."""
    plan = source_plan(tmp_path)
    source = OutputDataset(str(tmp_path / "out"), candidates=True)
    source.write_plan(plan)
    uri = plan.shards[0].uris[0]
    images = [image_row(uri, status="ok", error=None, width=40, height=30, n_masks=0, seconds=1.0)]
    candidates = candidates_table(candidate_rows(uri, [tile_row]))
    if floor is not None:
        candidates = candidates.replace_schema_metadata({FLOOR_KEY: floor})
    source.commit_shard(plan.shards[0], masks_table([], images, "EPSG:4326"), images_table(images), {}, candidates)
    return str(tmp_path / "out")


def test_a_nodata_tile_keeps_its_valid_pixels_on_its_first_row() -> None:
    valid = np.zeros((30, 40), dtype=bool)
    valid[5:25, 3:31] = True
    first, second = (crop_row(random_crop(4, [0, 0, 40, 30]), index, 2, 4, valid) for index in (0, 1))
    assert first["nodata"] and second["nodata"] and second["valid"] is None
    assert np.array_equal(decode_rle(first["valid"]).astype(bool), valid)
    whole = crop_row(random_crop(4, [0, 0, 40, 30]), 0, 0, 1, None)
    assert not whole["nodata"] and whole["valid"] is None


def test_nodata_candidates_without_their_valid_pixels_are_refused(tmp_path) -> None:
    """As an earlier sam-batch wrote them: nodata marked, valid pixels not kept."""
    row = crop_row(random_crop(4, [0, 0, 40, 30]), 0, 2, 4, np.ones((30, 40), dtype=bool)) | {"valid": None}
    source = committed_source(tmp_path, row)
    with pytest.raises(RefilterError, match="had nodata in tile 2, but its candidates do not hold the tile's valid"):
        refilter(source, [], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_the_floor_is_the_one_the_output_stored(tmp_path) -> None:
    floor = b'{"pred_iou_thresh": 0.7, "stability_score_thresh": 0.5}'
    source = committed_source(tmp_path, crop_row(random_crop(5, [0, 0, 40, 30]), 0, 0, 1, None), floor)
    with pytest.raises(RefilterError, match=r"amg.pred_iou_thresh 0.6 < 0.7"):
        refilter(source, ["amg.pred_iou_thresh=0.6"], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_output_candidates_is_true_or_false(tmp_path) -> None:
    job = {"name": "photos", "input": {"uris": ["a.jpg"]}, "output": {"uri": str(tmp_path), "candidates": "yes"}}
    with pytest.raises(JobError, match="output.candidates: expected true or false"):
        parse_job(job)
