"""Prompt jobs (`prompts.uri`) with HQ-SAM and SAM 2.1 through `sam-batch run`: every prompt's
masks are the ones the engine's predictor gives in process for that prompt (HQ-SAM: one mask a
prompt; SAM 2.1: three with multimask, cut at `amg.mask_threshold`). Their predictors' parity
with the official code:
`test_hq_parity.py`, `test_sam2_parity.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_prompts import golden_prompts
from test_run_end_to_end import sam_batch

from sam_batch.engines.factory import build_engine
from sam_batch.engines.sam2_engine import Sam2Generator
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.rle import decode_rle
from shared_data import GOLDEN, IMAGES

PROMPT_COLUMNS = ("prompt_id", "box", "points", "point_labels", "multimask_output")
# the job decodes a window's prompts of one shape in one call, the test one prompt at a time:
# matrix products of other sizes round differently, which moves pixels whose logits are within
# rounding of the threshold
MAX_FLIPPED_FRACTION = 0.001
SAM2_MASK_THRESHOLD = 2.0  # SAM2ImagePredictor's mask_threshold, through the job's amg.mask_threshold


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "checkpoint"), [("vit_t_hq", "hq_checkpoint"), ("sam2.1_hiera_t", "sam2_checkpoint")]
)
def test_a_prompt_job_gives_the_engines_predictions(
    tmp_path: Path, request: pytest.FixtureRequest, model_type: str, checkpoint: str
) -> None:
    if not (GOLDEN / "prompts").exists():
        pytest.skip(f"test data {GOLDEN / 'prompts'} not present")
    weights = str(request.getfixturevalue(checkpoint))
    prompts = golden_prompts("dog.jpg")
    rows = [{"image_uri": str(IMAGES / "dog.jpg"), **{key: p[key] for key in PROMPT_COLUMNS}} for p in prompts]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    job = {
        "name": "prompts",
        "input": {"uris": [str(IMAGES / "dog.jpg")]},
        "prompts": {"uri": str(tmp_path / "prompts.parquet")},
        "model": {"type": model_type, "checkpoint": weights},
        "output": {"uri": str(tmp_path / "out")},
        "run": {"executor": "local"},
    }
    if model_type == "sam2.1_hiera_t":
        job["amg"] = {"mask_threshold": SAM2_MASK_THRESHOLD}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    sam_batch("run", str(tmp_path / "job.yaml"))
    masks = pq.read_table(tmp_path / "out" / "masks").to_pylist()

    sam2 = model_type == "sam2.1_hiera_t"
    generator = Sam2Generator(mask_threshold=SAM2_MASK_THRESHOLD) if sam2 else None
    engine = build_engine(model_type, weights, device="cpu", sam2_generator=generator)
    crop = engine.encode(load_image(str(IMAGES / "dog.jpg")))
    expected, cut_by_threshold = 0, 0
    for prompt in prompts:
        points = None if prompt["points"] is None else np.array(prompt["points"], dtype=np.float64)[None]
        labels = None if prompt["point_labels"] is None else np.array(prompt["point_labels"])[None]
        box = None if prompt["box"] is None else np.array(prompt["box"], dtype=np.float64)[None]
        low_res, iou = engine.predict(crop, points, labels, box, prompt["multimask_output"])
        logits = engine.upscale(crop, low_res[0])
        binary = (logits > engine.mask_threshold).numpy()
        cut_by_threshold += int((logits > 0).sum()) - int(binary.sum())
        got = sorted((m for m in masks if m["prompt_id"] == prompt["prompt_id"]), key=lambda m: m["mask_index"])
        assert len(got) == len(binary), prompt["prompt_id"]
        for row, want, score in zip(got, binary, iou[0].tolist()):
            mask = decode_rle(row["segmentation"]).astype(bool)
            flipped = int((mask != want).sum())
            assert flipped <= MAX_FLIPPED_FRACTION * want.sum(), (prompt["prompt_id"], flipped, int(want.sum()))
            assert row["predicted_iou"] == pytest.approx(score, abs=1e-4)
        expected += len(binary)
    assert len(masks) == expected and expected > len(prompts) * sam2
    assert (cut_by_threshold > 0) == sam2  # SAM 2.1's masks lost the pixels with logits in (0, 2]
