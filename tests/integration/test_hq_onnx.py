"""HQ-SAM (vit_t_hq) on the `onnx` back-end, and `TensorRTEngine`'s HQ path with onnxruntime
standing in for TensorRT, against the torch engine on dog.jpg (CPU). The weights: MobileSAM's
for SAM's part, seeded noise for HQ-SAM's own (the `hq_checkpoint` fixture, `tests/conftest.py`).

Measured on the 2-core dev machine (2026-12-05, dog.jpg): embedding relative error 2.4e-6 and
HQ features 1.2e-6 (Frobenius); decode of 16 prompts max |Δ logits| 7.8e-5 (logits up to ~50),
max |Δ IoU| 2.4e-7; predict (boxes, points, both; multimask on and off) max |Δ logits| 8.0e-5,
max |Δ IoU| 6.0e-7; the generator's records at 4×4 and 8×8 points: the same masks, RLE for RLE.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_onnx import EMBEDDING_RTOL, IOU_ATOL, LOGITS_ATOL, dims
from test_tensorrt import OrtGraph

from sam_batch.engines.backend import CropEmbedding, set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.engines.onnx_backend import OnnxEngine
from sam_batch.engines.onnx_export import crop_inputs, predictor_output_shapes
from sam_batch.engines.tensorrt_backend import TensorRTEngine, pinned_to_fp32
from sam_batch.engines.torch_backend import TorchEngine
from sam_batch.engines.transforms import labelled_points, scale_coords
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES

# the HQ run test's thresholds: with noise for HQ-SAM's weights few masks pass the default 0.95
AMG_PARAMS = {"points_per_side": 4, "stability_score_thresh": 0.85}
N_PROMPTS = 6


@pytest.fixture(scope="module")
def engines(hq_checkpoint) -> tuple[TorchEngine, OnnxEngine]:
    set_cpu_threads()
    torch_engine = build_engine("vit_t_hq", str(hq_checkpoint), device="cpu")
    return torch_engine, build_engine("vit_t_hq", str(hq_checkpoint), device="cpu", backend="onnx")


@pytest.fixture(scope="module")
def dog() -> np.ndarray:
    return load_image(str(IMAGES / "dog.jpg"))


@pytest.fixture(scope="module")
def crop(engines, dog) -> CropEmbedding:
    """The torch engine's crop: the same embedding and HQ features into every decoder."""
    return engines[0].encode(dog)


def prompts(kind: str, dog: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """`N_PROMPTS` seeded prompts of one kind, as `predict` takes them: points (B, 3, 2), labels
    (B, 3), boxes (B, 4), in dog.jpg's pixels."""
    rng = np.random.default_rng(0)
    size = [dog.shape[1], dog.shape[0]]
    corners = rng.uniform(0, 1, (N_PROMPTS, 2, 2)) * size
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    points, labels = rng.uniform(0, 1, (N_PROMPTS, 3, 2)) * size, rng.integers(0, 2, (N_PROMPTS, 3))
    return {"boxes": (None, None, boxes), "points": (points, labels, None), "both": (points, labels, boxes)}[kind]


def test_hq_graphs_take_and_give_the_hq_features(engines) -> None:
    onnx_engine = engines[1]
    assert onnx_engine.hq
    files = onnx_engine.files
    encoder, decoder, predictor = (
        onnx.load(str(path)).graph for path in (files.encoder, files.decoder, files.predictor)
    )
    assert [i.name for i in encoder.input] == ["images"]
    assert [o.name for o in encoder.output] == ["image_embeddings", "hq_features"]  # shapes: the encode test
    inputs = {
        "image_embeddings": [1, 256, 64, 64],
        "point_coords": ["prompts", "points", 2],
        "point_labels": ["prompts", "points"],
        "hq_features": [1, 32, 256, 256],
    }
    assert {i.name: dims(i) for i in decoder.input} == {i.name: dims(i) for i in predictor.input} == inputs
    # the logits' last two dimensions are left unnamed by the exporter: 256 at run time (the decode test)
    assert {o.name: dims(o)[:2] for o in decoder.output} == {
        "low_res_logits": ["prompts", 1],
        "iou_predictions": ["prompts", 1],
    }
    assert {o.name: dims(o) for o in predictor.output} == {
        "low_res_logits": ["prompts", 5, 256, 256],
        "iou_predictions": ["prompts", 4],
    }


def test_hq_graphs_give_tensorrts_pinning_its_layers(engines) -> None:
    """As SAM's graphs (test_tensorrt.py): LayerNorm as one node, never decomposed; the decoder's
    point encoding named under prompt_encoder/ in the decoder and predictor graphs."""
    files = engines[1].files
    for path in (files.encoder, files.decoder, files.predictor):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert "LayerNormalization" in ops and "Pow" not in ops and "ReduceMean" not in ops
    for path in (files.decoder, files.predictor):
        trig = [node.name for node in onnx.load(str(path)).graph.node if node.op_type in ("Sin", "Cos")]
        assert trig and all(pinned_to_fp32("UNARY", name) for name in trig), (path.name, trig)


def test_hq_encoder_matches_torch(engines, crop, dog) -> None:
    ours = engines[1].encode(dog)
    assert ours.hq_features is not None and ours.hq_features.shape == (1, 32, 256, 256)
    assert (ours.input_hw, ours.crop_hw) == (crop.input_hw, crop.crop_hw)
    for got, want in ((ours.embedding, crop.embedding), (ours.hq_features, crop.hq_features)):
        error = (got - want).norm() / want.norm()
        assert got.dtype == torch.float32 and error < EMBEDDING_RTOL, float(error)


@pytest.mark.parametrize("n_prompts", [16, 1])
def test_hq_decode_matches_torch(engines, crop, dog, n_prompts: int) -> None:
    """One mask a point (SAM's best of three, more than one token picked among the points, plus
    the HQ token's), at prompt batches other than the trace's."""
    torch_engine, onnx_engine = engines
    points = np.random.default_rng(n_prompts).uniform(0, 1, (n_prompts, 2)) * [dog.shape[1], dog.shape[0]]
    if n_prompts > 1:
        assert len(chosen_tokens(onnx_engine, crop, points[:, None], np.ones((n_prompts, 1)), None)) > 1
    logits, iou = onnx_engine.decode(crop, points)
    expected_logits, expected_iou = torch_engine.decode(crop, points)
    assert logits.shape == (n_prompts, 1, 256, 256) and iou.shape == (n_prompts, 1)
    torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


def chosen_tokens(
    engine: OnnxEngine,
    crop: CropEmbedding,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
) -> set[int]:
    """The mask tokens (1-3) that multimask picks for these prompts, read from the predictor graph."""
    coords, tags = labelled_points(points, labels, boxes)
    out = engine.predictor(
        predictor_output_shapes(len(coords), hq=True),
        **crop_inputs(crop, hq=True),
        point_coords=torch.from_numpy(scale_coords(coords, crop.crop_hw)),
        point_labels=torch.from_numpy(tags),
    )
    return set((out["iou_predictions"][:, 1:].argmax(dim=1) + 1).tolist())


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["boxes", "points", "both"])
def test_hq_predict_matches_torch(engines, crop, dog, kind: str, multimask: bool) -> None:
    """The predictor graph's every output, combined by the engine: with multimask the mask token
    of highest IoU (more than one token picked among the prompts), else token 0."""
    torch_engine, onnx_engine = engines
    assert len(chosen_tokens(onnx_engine, crop, *prompts(kind, dog))) > 1
    logits, iou = onnx_engine.predict(crop, *prompts(kind, dog), multimask)
    expected_logits, expected_iou = torch_engine.predict(crop, *prompts(kind, dog), multimask)
    assert logits.shape == (N_PROMPTS, 1, 256, 256) and iou.shape == (N_PROMPTS, 1)
    torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


def test_hq_generator_gives_the_torch_engines_records(engines, dog) -> None:
    torch_engine, onnx_engine = engines
    expected = to_records(generate_masks(torch_engine, dog, AmgParams(**AMG_PARAMS)))
    ours = to_records(generate_masks(onnx_engine, dog, AmgParams(**AMG_PARAMS)))
    assert len(expected) >= 3
    assert [r["segmentation"] for r in ours] == [r["segmentation"] for r in expected]
    assert [r["bbox"] for r in ours] == [r["bbox"] for r in expected]
    assert np.allclose([r["predicted_iou"] for r in ours], [r["predicted_iou"] for r in expected], atol=IOU_ATOL)


def test_tensorrt_engines_hq_path(engines, crop, dog) -> None:
    """`TensorRTEngine` on HQ-SAM's graphs, onnxruntime standing in for TensorRT (`OrtGraph`), in
    chunks of 5 prompts: its encode, decode and predict against the torch engine."""
    torch_engine, onnx_engine = engines
    files = onnx_engine.files
    engine = TensorRTEngine(
        OrtGraph(files.encoder),
        OrtGraph(files.decoder),
        torch.device("cpu"),
        5,
        lambda: OrtGraph(files.predictor),
        hq=True,
    )
    encoded = engine.encode(dog)
    for got, want in ((encoded.embedding, crop.embedding), (encoded.hq_features, crop.hq_features)):
        assert float((got - want).norm() / want.norm()) < EMBEDDING_RTOL
    points = np.random.default_rng(12).uniform(0, 1, (12, 2)) * [dog.shape[1], dog.shape[0]]
    both = prompts("both", dog)
    pairs = [
        (engine.decode(crop, points), torch_engine.decode(crop, points)),
        (engine.predict(crop, *both, True), torch_engine.predict(crop, *both, True)),
    ]
    for (logits, iou), (expected_logits, expected_iou) in pairs:
        assert logits.shape[1:] == (1, 256, 256) and iou.shape[1] == 1
        torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)
    assert engine.decoder.batches == [5, 5, 2]
