"""SAM 2.1 (`sam2.1_hiera_*` model types) without the reference environment: the weights table,
single-mask output, the engine's frames, the tensorrt back-end's refusal where it is missing,
and `sam-batch run` end to end, automatic and with mask-to-mask refinement. Parity with the official code:
`test_sam2_parity.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_run_end_to_end import sam_batch, write_job

from sam_batch.engines.backend import EngineError
from sam_batch.engines.checkpoints import KNOWN_CHECKPOINTS, UrlSource
from sam_batch.engines.factory import build_engine
from sam_batch.engines.registry import MODEL_TYPES, is_sam2
from sam_batch.engines.sam2 import build_sam2
from sam_batch.engines.sam2_decoder import DYNAMIC_MULTIMASK_DELTA, dynamic_single_mask
from sam_batch.engines.sam2_engine import Sam2Engine, Sam2Generator
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES

SAM2_TYPES = [t for t in MODEL_TYPES if is_sam2(t)]
VIDEO_ONLY = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "maskmem_tpos_enc", "no_obj_ptr")


def test_every_sam2_type_names_its_official_file() -> None:
    assert SAM2_TYPES == ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"]
    sizes = ("tiny", "small", "base_plus", "large")
    for model_type, size in zip(SAM2_TYPES, sizes):
        known = KNOWN_CHECKPOINTS[model_type]
        assert known.filename == f"sam2.1_hiera_{size}.pt" and len(known.sha256) == 64
        (source,) = known.sources
        assert isinstance(source, UrlSource) and source.url.endswith(f"/092824/{known.filename}")
        with torch.device("meta"):
            keys = list(build_sam2(model_type).state_dict())
        assert all(any(key.startswith(part) for key in keys) for part in VIDEO_ONLY)  # carried for strict loads


def test_single_mask_output_falls_back_to_the_best_multimask_output_when_unstable() -> None:
    logits = torch.zeros(2, 4, 8, 8)
    logits[0, 0] = 5.0  # stable: every pixel far above +delta
    logits[1, 0, :, :4] = DYNAMIC_MULTIMASK_DELTA / 2  # half the pixels between -delta and +delta
    logits[1, 0, :, 4:] = 5.0
    iou = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.1, 0.2, 0.8, 0.8]])
    chosen, chosen_iou = dynamic_single_mask(logits, iou)
    assert chosen.shape == (2, 1, 8, 8) and chosen_iou[:, 0].tolist() == pytest.approx([0.1, 0.8])
    assert torch.equal(chosen[0, 0], logits[0, 0]) and torch.equal(chosen[1, 0], logits[1, 2])  # first of a tie


def test_the_engine_works_in_the_models_square_frame(sam2_checkpoint: Path) -> None:
    """A crop is encoded at 1024 x 1024 whatever its aspect, with both high-resolution levels;
    the generator's points give three masks, one without multimask, the same shapes with m2m;
    logits come back at the crop's size in one interpolation."""
    engine = build_engine("sam2.1_hiera_t", str(sam2_checkpoint), device="cpu")
    assert isinstance(engine, Sam2Engine) and engine.generator == Sam2Generator()
    image = load_image(str(IMAGES / "dog.jpg"))[:300, :500]
    crop = engine.encode(image)
    assert crop.input_hw == (1024, 1024) and crop.crop_hw == (300, 500)
    assert [tuple(f.shape) for f in crop.high_res_features] == [(1, 32, 256, 256), (1, 64, 128, 128)]
    points = np.array([[100.0, 100.0], [400.0, 250.0]])
    logits, iou = engine.decode(crop, points)
    assert logits.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
    assert engine.upscale(crop, logits[:, 0]).shape == (2, 300, 500)
    single = Sam2Engine(engine.networks, Sam2Generator(multimask_output=False))
    assert single.decode(crop, points)[0].shape == (2, 1, 256, 256)
    refined = Sam2Engine(engine.networks, Sam2Generator(use_m2m=True))
    refined_logits, refined_iou = refined.decode(crop, points)
    assert refined_logits.shape == (2, 3, 256, 256) and not torch.equal(refined_iou, iou)


def test_tensorrt_names_what_it_lacks_for_sam2_before_loading() -> None:
    with pytest.raises(EngineError, match="engine.backend tensorrt needs the `tensorrt` package"):
        build_engine("sam2.1_hiera_l", "/nowhere/sam2.1_hiera_large.pt", backend="tensorrt", device="cpu")


@pytest.mark.slow
def test_sam_batch_run_with_a_sam2_model(tmp_path: Path, sam2_checkpoint: Path) -> None:
    """`sam-batch run` with `model.type: sam2.1_hiera_t` and SAM 2's generator keys, on the torch
    and onnx back-ends, writes the masks the generator makes in process with the same weights
    and settings."""
    params = {"points_per_side": 4, "pred_iou_thresh": 0.56, "stability_score_thresh": 0.35}
    engine = build_engine(
        "sam2.1_hiera_t", str(sam2_checkpoint), device="cpu", sam2_generator=Sam2Generator(use_m2m=True)
    )
    ours = to_records(generate_masks(engine, load_image(str(IMAGES / "dog.jpg")), AmgParams(**params)))
    assert len(ours) >= 3
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        job = write_job(
            tmp_path,
            f"sam2-{backend}",
            [str(IMAGES / "dog.jpg")],
            out,
            model={"type": "sam2.1_hiera_t", "checkpoint": str(sam2_checkpoint)},
            amg={**params, "use_m2m": True},
            engine={"backend": backend},
            run={"executor": "local"},
        )
        sam_batch("run", str(job))
        rows = pq.read_table(out / "masks").sort_by("mask_id").to_pylist()
        assert [r["area"] for r in rows] == [r["area"] for r in ours], backend
        assert [r["bbox"] for r in rows] == [[float(v) for v in r["bbox"]] for r in ours], backend
