"""SAM 2.1 (sam2.1_hiera_t) on the `onnx` back-end, and SAM 2.1's TensorRT path
(`GraphSam2Networks` as `sam2_tensorrt_networks` builds it) with onnxruntime standing in for
TensorRT, against the torch engine on dog.jpg (CPU). The weights: a noise trunk with MobileSAM's
prompt encoder and decoder (the `sam2_checkpoint` fixture, `tests/conftest.py`), so that masks follow
the prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import test_hq_onnx
import torch
from test_onnx import EMBEDDING_RTOL, IOU_ATOL, LOGITS_ATOL, dims
from test_run_end_to_end import sam_batch
from test_tensorrt import OrtGraph

from sam_batch.engines.backend import CropEmbedding, EngineError, load_model, set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.engines.onnx_export import OnnxFiles, cached_onnx
from sam_batch.engines.sam2_engine import GraphSam2Networks, Sam2Engine, Sam2Generator
from sam_batch.engines.tensorrt_backend import SAM2_PREDICTOR_PROFILE, pinned_to_fp32

dog = test_hq_onnx.dog
N_PROMPTS, prompts = test_hq_onnx.N_PROMPTS, test_hq_onnx.prompts  # seeded boxes, points, both
GENERATORS = {
    "multimask": Sam2Generator(),
    "single": Sam2Generator(multimask_output=False),
    "m2m": Sam2Generator(use_m2m=True),
}
HIGH_RES = {"high_res_feats_0": [1, 32, 256, 256], "high_res_feats_1": [1, 64, 128, 128]}


@pytest.fixture(scope="module")
def engines(sam2_checkpoint: Path) -> tuple[Sam2Engine, Sam2Engine]:
    """The torch engine and the onnx engine of the same weights, SAM 2's default generator."""
    set_cpu_threads()
    return (
        build_engine("sam2.1_hiera_t", str(sam2_checkpoint), device="cpu"),
        build_engine("sam2.1_hiera_t", str(sam2_checkpoint), device="cpu", backend="onnx"),
    )


@pytest.fixture(scope="module")
def files(engines, sam2_checkpoint: Path) -> OnnxFiles:
    """The graphs the onnx engine runs (exported when it was built, read from the cache)."""
    return cached_onnx(load_model("sam2.1_hiera_t", str(sam2_checkpoint)))


@pytest.fixture(scope="module")
def crop(engines, dog) -> CropEmbedding:
    """The torch engine's crop: the same embedding and features into every decoder."""
    return engines[0].encode(dog)


def with_generator(engine: Sam2Engine, generator: Sam2Generator) -> Sam2Engine:
    return Sam2Engine(engine.networks, generator)


def test_sam2_graphs_inputs_and_outputs(files: OnnxFiles) -> None:
    paths = (files.encoder, files.decoder, files.predictor)
    encoder, decoder, predictor = (onnx.load(str(path)).graph for path in paths)
    assert [i.name for i in encoder.input] == ["images"]
    # the encoder's output dimensions are resolved at run time, not named (the encode test checks them)
    assert [o.name for o in encoder.output] == ["image_embeddings", *HIGH_RES]
    prompts_in = {"point_coords": ["prompts", "points", 2], "point_labels": ["prompts", "points"]}
    assert {i.name: dims(i) for i in decoder.input} == {"image_embeddings": [1, 256, 64, 64], **HIGH_RES, **prompts_in}
    assert {i.name: dims(i) for i in predictor.input} == {
        "image_embeddings": [1, 256, 64, 64],
        **HIGH_RES,
        **prompts_in,
        "mask_input": ["prompts", 1, 256, 256],
        "has_mask_input": [1],
    }
    for graph in (decoder, predictor):  # every mask token's output; the last two dimensions: 256 (decode tests)
        assert {o.name: dims(o)[:2] for o in graph.output} == {
            "low_res_logits": ["prompts", 4],
            "iou_predictions": ["prompts", 4],
        }


def test_sam2_graphs_give_tensorrts_pinning_its_layers(files: OnnxFiles) -> None:
    """As SAM's graphs (test_tensorrt.py): LayerNorm as one node, never decomposed; the point
    encoding named under prompt_encoder/ in the decoder and predictor graphs."""
    for path in (files.encoder, files.decoder, files.predictor):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert "LayerNormalization" in ops and "Pow" not in ops and "ReduceMean" not in ops, path.name
    for path in (files.decoder, files.predictor):
        trig = [node.name for node in onnx.load(str(path)).graph.node if node.op_type in ("Sin", "Cos")]
        assert trig and all(pinned_to_fp32("UNARY", name) for name in trig), trig


def test_sam2_encoder_matches_torch(engines, crop, dog) -> None:
    ours = engines[1].encode(dog)
    assert (ours.input_hw, ours.crop_hw) == (crop.input_hw, crop.crop_hw)
    pairs = [(ours.embedding, crop.embedding), *zip(ours.high_res_features, crop.high_res_features)]
    for got, want in pairs:
        error = (got - want).norm() / want.norm()
        assert got.dtype == torch.float32 and got.shape == want.shape and error < EMBEDDING_RTOL, float(error)


@pytest.mark.parametrize("n_prompts", [16, 1])
@pytest.mark.parametrize("generator", list(GENERATORS))
def test_sam2_decode_matches_torch(engines, crop, dog, generator: str, n_prompts: int) -> None:
    """The generator's points: three masks, one (dynamic single mask), or three refined (m2m),
    at prompt batches other than the trace's."""
    torch_engine, onnx_engine = (with_generator(engine, GENERATORS[generator]) for engine in engines)
    points = np.random.default_rng(n_prompts).uniform(0, 1, (n_prompts, 2)) * [dog.shape[1], dog.shape[0]]
    logits, iou = onnx_engine.decode(crop, points)
    expected_logits, expected_iou = torch_engine.decode(crop, points)
    masks = 1 if generator == "single" else 3
    assert logits.shape == (n_prompts, masks, 256, 256) and iou.shape == (n_prompts, masks)
    torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["boxes", "points", "both"])
def test_sam2_predict_matches_torch(engines, crop, dog, kind: str, multimask: bool) -> None:
    """The predictor graph without a mask prompt (`has_mask_input` 0) gives the torch engine's
    masks for boxes, points and both."""
    torch_engine, onnx_engine = engines
    logits, iou = onnx_engine.predict(crop, *prompts(kind, dog), multimask)
    expected_logits, expected_iou = torch_engine.predict(crop, *prompts(kind, dog), multimask)
    masks = 3 if multimask else 1
    assert logits.shape == (N_PROMPTS, masks, 256, 256) and iou.shape == (N_PROMPTS, masks)
    torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


def test_sam2_tensorrt_path_with_onnxruntime_standing_in(engines, files, crop, dog) -> None:
    """`GraphSam2Networks` as the TensorRT back-end builds it, `OrtGraph`s in place of TensorRT's:
    prompts 5 a call; the predictor made only for prompts or m2m; a prompt beyond the predictor
    profile refused before it is made; masks as the torch engine's."""
    made: list[OrtGraph] = []

    def make_predictor() -> OrtGraph:
        made.append(OrtGraph(files.predictor))
        return made[-1]

    decoder = OrtGraph(files.decoder)
    networks = GraphSam2Networks(
        OrtGraph(files.encoder), decoder, make_predictor, torch.device("cpu"), 5, SAM2_PREDICTOR_PROFILE.max_points
    )
    engine, torch_engine = Sam2Engine(networks), engines[0]
    encoded = engine.encode(dog)
    assert float((encoded.embedding - crop.embedding).norm() / crop.embedding.norm()) < EMBEDDING_RTOL
    points = np.random.default_rng(12).uniform(0, 1, (12, 2)) * [dog.shape[1], dog.shape[0]]
    pairs = [(engine.decode(crop, points), torch_engine.decode(crop, points))]
    assert decoder.batches == [5, 5, 2] and made == []
    limit = SAM2_PREDICTOR_PROFILE.max_points
    too_many = np.zeros((1, limit - 1, 2)), np.ones((1, limit - 1))  # with a box: two corners more
    with pytest.raises(EngineError, match=f"at most {limit} labelled points"):
        engine.predict(crop, *too_many, np.array([[0.0, 0.0, 9.0, 9.0]]), False)
    assert made == []
    both = prompts("both", dog)
    pairs.append((engine.predict(crop, *both, True), torch_engine.predict(crop, *both, True)))
    m2m, torch_m2m = (with_generator(e, GENERATORS["m2m"]) for e in (engine, torch_engine))
    pairs.append((m2m.decode(crop, points[:7]), torch_m2m.decode(crop, points[:7])))
    assert len(made) == 1 and made[0].batches == [5, 1, 5, 2, 5, 2, 5, 2]
    for (logits, iou), (expected_logits, expected_iou) in pairs:
        torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


def test_export_onnx_writes_sam2_graphs(tmp_path: Path, sam2_checkpoint: Path) -> None:
    out = tmp_path / "onnx"
    result = sam_batch("export-onnx", "sam2.1_hiera_t", "--checkpoint", str(sam2_checkpoint), "-o", str(out))
    assert result.stdout.split() == [str(out / name) for name in ("encoder.onnx", "decoder.onnx", "predictor.onnx")]
    outputs = [o.name for o in onnx.load(str(out / "encoder.onnx")).graph.output]
    assert outputs == ["image_embeddings", *HIGH_RES]
