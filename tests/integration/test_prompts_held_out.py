"""Prompt tables on held-out prompt files: the reference predictor's masks for 24 seeded prompts
on each of groceries.jpg and picture1.jpg (`tests/data/held_out_prompts`, written by
`tests/data/make_held_out_prompts.py` in `.venv-ref`), which the project was not tuned on,
through one `sam-batch run` over both images."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prompts import write_prompt_job
from test_run_end_to_end import sam_batch

from sam_batch.pipeline.rle import decode_rle
from shared_data import IMAGES, PARITY_LINES, TEST_DATA

HELD_OUT_PROMPTS = TEST_DATA / "held_out_prompts"
PHOTOS = ["groceries.jpg", "picture1.jpg"]


def held_out(name: str) -> dict:
    return json.loads((HELD_OUT_PROMPTS / f"{name}.prompts.json").read_text())


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory) -> Path:
    """Both files' prompts as one Parquet table (the reference's prompt ids), one run."""
    tmp = tmp_path_factory.mktemp("held_out_prompts")
    rows = [
        {
            "image_uri": str(IMAGES / name),
            "prompt_id": p["prompt_id"],
            "box": p["box"],
            "points": p["points"],
            "point_labels": p["point_labels"],
            "multimask_output": p["multimask_output"],
        }
        for name in PHOTOS
        for p in held_out(name)["prompts"]
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp / "prompts.parquet")
    sam_batch("run", str(write_prompt_job(tmp, [IMAGES / n for n in PHOTOS], tmp / "prompts.parquet")))
    return tmp


def test_the_held_out_files_are_what_the_test_expects() -> None:
    for name in PHOTOS:
        record = held_out(name)
        assert record["image"] == name and record["predictor"] == "SamPredictor.predict"
        kinds = [p["prompt_id"].split("-", 1)[1] for p in record["prompts"]]
        assert len(kinds) == 24 and {k: kinds.count(k) for k in set(kinds)} == {"box": 8, "point": 8, "box+points": 8}


def test_held_out_masks_are_the_reference_predictors_through_run(held_out_run: Path) -> None:
    masks = pq.read_table(held_out_run / "out" / "masks").to_pylist()
    images = {r["image_uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(held_out_run / "out" / "images").to_pylist()}
    worst_iou, worst_score, compared = 1.0, 0.0, 0
    for name in PHOTOS:
        record = held_out(name)
        row = images[name]
        assert (row["status"], row["n_prompts"], row["prompt_errors"]) == ("ok", 24, [])
        assert [row["height"], row["width"]] == record["shape"][:2]
        mine = [m for m in masks if m["image_uri"].endswith(name)]
        for prompt in record["prompts"]:
            rows = sorted((m for m in mine if m["prompt_id"] == prompt["prompt_id"]), key=lambda m: m["mask_index"])
            assert len(rows) == len(prompt["masks"]) == (3 if prompt["multimask_output"] else 1), prompt["prompt_id"]
            for ours_row, reference, score in zip(rows, prompt["masks"], prompt["scores"]):
                ours, theirs = decode_rle(ours_row["segmentation"]).astype(bool), decode_rle(reference).astype(bool)
                union = (ours | theirs).sum()
                iou = (ours & theirs).sum() / union if union else 1.0
                worst_iou = min(worst_iou, iou)
                worst_score = max(worst_score, abs(ours_row["predicted_iou"] - score))
                compared += 1
    PARITY_LINES.append(
        f"held-out prompts ({compared} masks): min IoU {worst_iou:.5f}, max |d score| {worst_score:.2g}"
    )
    assert worst_iou >= 0.99 and worst_score <= 1e-4, (worst_iou, worst_score)
