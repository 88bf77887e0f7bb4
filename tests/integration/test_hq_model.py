"""HQ-SAM (`*_hq` model types) without the reference environment: the weights table, the
decoder's choice of SAM's mask, a checkpoint of the wrong layout, the TensorRT back-end and
`sam-batch export-onnx` taking it, and `sam-batch run` end to end. Parity with the official
code: `test_hq_parity.py`; the onnx back-end against torch: `test_hq_onnx.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from seeded_checkpoints import HQ_PARTS
from test_run_end_to_end import sam_batch, write_job

from sam_batch.engines.backend import EngineError, load_model
from sam_batch.engines.checkpoints import KNOWN_CHECKPOINTS, UrlSource
from sam_batch.engines.factory import build_engine
from sam_batch.engines.hq_decoder import HqMaskDecoder
from sam_batch.engines.registry import MODEL_TYPES, is_hq
from sam_batch.engines.sam import build_sam
from sam_batch.engines.torch_backend import TorchEngine
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, MOBILE_SAM

HQ_TYPES = [t for t in MODEL_TYPES if is_hq(t)]


def test_every_hq_type_names_its_official_file() -> None:
    assert HQ_TYPES == ["vit_t_hq", "vit_b_hq", "vit_l_hq", "vit_h_hq"]
    for model_type in HQ_TYPES:
        known = KNOWN_CHECKPOINTS[model_type]
        assert known.filename.startswith("sam_hq_vit_") and len(known.sha256) == 64
        (source,) = known.sources
        assert isinstance(source, UrlSource) and source.url.endswith(f"/lkeab/hq-sam/resolve/main/{known.filename}")
        with torch.device("meta"):
            keys = build_sam(model_type).state_dict().keys()
        assert {part for part in HQ_PARTS for key in keys if key.startswith(f"mask_decoder.{part}.")} == set(HQ_PARTS)


def test_the_hq_mask_is_sams_chosen_mask_plus_the_hq_tokens() -> None:
    """The decoder's one mask per prompt equals its every-output form combined by hand: SAM's
    multimask output with the highest IoU (or token 0 without multimask) plus the HQ token's."""
    torch.manual_seed(0)
    decoder = HqMaskDecoder(early_dim=160).eval()
    embedding, pe = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    sparse, dense = torch.randn(5, 3, 256), torch.randn(1, 256, 1, 1)
    hq_features = decoder.hq_features(embedding, torch.randn(1, 160, 64, 64))
    with torch.no_grad():
        every, iou_all = decoder(embedding, pe, sparse, dense, None, hq_features)
        multi, multi_iou = decoder(embedding, pe, sparse, dense, True, hq_features)
        single, single_iou = decoder(embedding, pe, sparse, dense, False, hq_features)
    assert every.shape == (5, 5, 256, 256) and iou_all.shape == (5, 4)
    best = iou_all[:, 1:].argmax(1) + 1
    assert len(set(best.tolist())) > 1  # the choice is exercised
    torch.testing.assert_close(multi[:, 0], every[torch.arange(5), best] + every[:, 4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(multi_iou[:, 0], iou_all[torch.arange(5), best])
    torch.testing.assert_close(single[:, 0], every[:, 0] + every[:, 4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(single_iou[:, 0], iou_all[:, 0])


def test_a_sam_checkpoint_is_not_an_hq_one(hq_checkpoint: Path) -> None:
    with pytest.raises(EngineError) as error:
        load_model("vit_t_hq", str(MOBILE_SAM))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{MOBILE_SAM}: does not fit model vit_t_hq: Missing key(s)")
    with pytest.raises(EngineError, match="does not fit model vit_t: Unexpected key"):
        load_model("vit_t", str(hq_checkpoint))


def test_the_tensorrt_back_end_takes_hq_types() -> None:
    """No HQ refusal: an HQ type meets the TensorRT back-end's own check, before any weights load
    (the engine's HQ path: test_hq_onnx.py, onnxruntime standing in for TensorRT)."""
    with pytest.raises(
        EngineError, match="engine.backend tensorrt needs the `tensorrt` package .* engine.device is cpu"
    ):
        build_engine("vit_h_hq", "/nowhere/sam_hq_vit_h.pth", backend="tensorrt", device="cpu")


def test_export_onnx_writes_hq_graphs(tmp_path: Path, hq_checkpoint: Path) -> None:
    """`sam-batch export-onnx vit_t_hq` writes the three graphs, with the HQ features out of the
    encoder and into the decoder and predictor (their parity: test_hq_onnx.py)."""
    import onnx

    out = tmp_path / "onnx"
    result = sam_batch("export-onnx", "vit_t_hq", "--checkpoint", str(hq_checkpoint), "-o", str(out))
    assert result.stdout.split() == [str(out / name) for name in ("encoder.onnx", "decoder.onnx", "predictor.onnx")]
    encoder, decoder, predictor = (onnx.load(path).graph for path in result.stdout.split())
    assert [o.name for o in encoder.output] == ["image_embeddings", "hq_features"]
    for graph in (decoder, predictor):
        assert [i.name for i in graph.input] == ["image_embeddings", "point_coords", "point_labels", "hq_features"]


@pytest.mark.slow
def test_sam_batch_run_with_an_hq_model(tmp_path: Path, hq_checkpoint: Path) -> None:
    """`sam-batch run` with `model.type: vit_t_hq` writes the masks the generator makes in
    process with the same weights, in both torch layouts."""
    params = {"points_per_side": 4, "stability_score_thresh": 0.85}
    out = tmp_path / "out"
    job = write_job(
        tmp_path,
        "hq",
        [str(IMAGES / "dog.jpg")],
        out,
        model={"type": "vit_t_hq", "checkpoint": str(hq_checkpoint)},
        amg=params,
        run={"executor": "local"},
    )
    sam_batch("run", str(job))
    rows = pq.read_table(out / "masks").sort_by("mask_id").to_pylist()
    image = load_image(str(IMAGES / "dog.jpg"))
    engine = build_engine("vit_t_hq", str(hq_checkpoint), device="cpu")
    assert isinstance(engine, TorchEngine) and engine.point_decoder is None
    ours = to_records(generate_masks(engine, image, AmgParams(**params)))
    assert len(ours) >= 3 and [r["area"] for r in rows] == [r["area"] for r in ours]
    assert [r["bbox"] for r in rows] == [[float(v) for v in r["bbox"]] for r in ours]
    gpu_layout = build_engine("vit_t_hq", str(hq_checkpoint), device="cpu", layout="gpu")
    again = to_records(generate_masks(gpu_layout, image, AmgParams(**params)))
    assert [r["segmentation"] for r in again] == [r["segmentation"] for r in ours]
    assert np.allclose([r["predicted_iou"] for r in again], [r["predicted_iou"] for r in ours], atol=1e-5)
