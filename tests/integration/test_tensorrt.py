"""The TensorRT back-end: its configuration without TensorRT, its error without it, and (on a GPU
with `tensorrt` installed) parity with the torch engine. The ONNX graphs it consumes are built and
checked in test_onnx.py; here, that they carry what the precision pinning relies on.

Without TensorRT, `TensorRTEngine`'s own code (prompts as labelled points, chunks of the
profile's batch, the outputs a prompt keeps, the predictor built on the first prompt) runs with
onnxruntime standing in for the TensorRT runtime: `OrtGraph` runs the same ONNX graphs that
TensorRT would build its engines from, called as `TrtGraph` is called.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import yaml

from benchmarks.reference import agreement
from sam_batch.engines import factory
from sam_batch.engines.backend import EngineError, load_model
from sam_batch.engines.factory import build_engine
from sam_batch.engines.onnx_export import cached_onnx
from sam_batch.engines.tensorrt_backend import (
    PREDICTOR_PROFILE,
    DecoderProfile,
    TensorRTEngine,
    _pin_layers,
    check_precision,
    pinned_to_fp32,
    plan_name,
    require_tensorrt,
)
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.prompts import Prompt, plan_prompts, segment_prompts
from sam_batch.pipeline.rasters import ArrayScene
from sam_batch.pipeline.rle import decode_rle
from shared_data import GOLDEN, IMAGES, MOBILE_SAM

MIN_AGREEMENT = 0.98  # recall and precision at IoU 0.9 of TensorRT's masks against the torch engine's

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")


def _missing() -> str | None:
    try:
        require_tensorrt("cuda")
    except EngineError as error:
        return str(error)
    return None


MISSING = _missing()
needs_tensorrt = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def test_decoder_profile_spans_one_to_1024_prompts() -> None:
    shapes = DecoderProfile().shapes()
    assert shapes == {
        "point_coords": ((1, 1, 2), (256, 1, 2), (1024, 16, 2)),
        "point_labels": ((1, 1), (256, 1), (1024, 16)),
    }
    assert DecoderProfile(opt_prompts=64).shapes()["point_coords"][1] == (64, 1, 2)
    with pytest.raises(ValueError):
        DecoderProfile(opt_prompts=2048)
    with pytest.raises(ValueError):
        DecoderProfile(opt_points=0)


def test_normalisation_softmax_reductions_and_point_encoding_stay_fp32() -> None:
    for layer_type in ("NORMALIZATION", "SOFTMAX", "REDUCE"):
        assert pinned_to_fp32(layer_type, "/mask_decoder/transformer/layers.0/norm1/LayerNormalization")
    assert pinned_to_fp32("UNARY", "/prompt_encoder/Sin")
    for layer_type in ("MATRIX_MULTIPLY", "CONVOLUTION", "ELEMENTWISE", "ACTIVATION"):
        assert not pinned_to_fp32(layer_type, "/mask_decoder/transformer/layers.0/mlp/lin1/MatMul")


def test_pinning_sets_precision_and_output_types_on_float_layers_only() -> None:
    def layer(type_name: str, name: str, dtype: str):
        return SimpleNamespace(
            type=SimpleNamespace(name=type_name),
            name=name,
            num_outputs=1,
            precision=None,
            output_types={},
            get_output=lambda j: SimpleNamespace(dtype=dtype),
        )

    layers = [
        layer("NORMALIZATION", "norm1/LayerNormalization", "float32"),
        layer("SOFTMAX", "self_attn/Softmax", "float32"),
        layer("MATRIX_MULTIPLY", "self_attn/MatMul", "float32"),
        layer("ELEMENTWISE", "/prompt_encoder/Equal", "bool"),  # a mask, not arithmetic to pin
    ]
    for item in layers:
        item.set_output_type = item.output_types.__setitem__
    trt = SimpleNamespace(float32="float32")
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    assert _pin_layers(trt, network) == 2
    assert [item.precision for item in layers] == ["float32", "float32", None, None]
    assert [item.output_types for item in layers] == [{0: "float32"}, {0: "float32"}, {}, {}]


def test_exported_graphs_give_the_pinning_its_layers() -> None:
    """LayerNorm is one LayerNormalization node (opset 17: one TensorRT normalisation layer), never
    decomposed; softmax is one node; the point encoding's nodes are named under prompt_encoder/ in
    both decoding graphs."""
    files = cached_onnx(load_model("vit_t"))
    for path in (files.encoder, files.decoder):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert "LayerNormalization" in ops and "Softmax" in ops
        assert "Pow" not in ops and "ReduceMean" not in ops  # no hand-written variance in fp16
    for path in (files.decoder, files.predictor):  # the predictor's too: it calls the prompt encoder's forward
        trig = [node.name for node in onnx.load(str(path)).graph.node if node.op_type in ("Sin", "Cos")]
        assert trig and all(pinned_to_fp32("UNARY", name) for name in trig), (path.name, trig)


def test_low_precision_needs_tensorrt_10() -> None:
    check_precision("fp32", "11.1.0")
    check_precision("fp16", "10.13.0.35")
    check_precision("bf16", "10.13.0.35")
    with pytest.raises(EngineError, match=r"tensorrt-cu12<11"):
        check_precision("fp16", "11.1.0")
    with pytest.raises(EngineError, match="int8"):
        check_precision("int8", "10.13.0.35")


def test_plan_cache_key_names_precision_gpu_capability_version_and_profile() -> None:
    args = dict(
        graph="decoder",
        precision="fp16",
        gpu_name="NVIDIA H100 80GB HBM3",
        capability=(9, 0),
        trt_version="10.13.0.35",
        profile=DecoderProfile(),
    )
    name = plan_name(**args)
    assert name.startswith("decoder-fp16-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35-") and name.endswith(".plan")
    for change in (
        {"precision": "fp32"},
        {"gpu_name": "NVIDIA A10G"},
        {"capability": (8, 6)},
        {"trt_version": "10.12.0.36"},
        {"profile": DecoderProfile(max_prompts=512)},
    ):
        assert plan_name(**{**args, **change}) != name, change
    assert plan_name(**{**args, "graph": "encoder", "profile": None}).endswith("-static.plan")


def test_missing_package_and_gpu_are_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError) as error:
        require_tensorrt("auto")
    message = str(error.value)
    assert message.startswith(
        "engine.backend tensorrt needs the `tensorrt` package (pip install tensorrt-cu12) and a CUDA GPU"
    )
    assert "no `tensorrt` package" in message and "no CUDA GPU visible" in message
    with pytest.raises(EngineError, match="engine.device is cpu"):
        require_tensorrt("cpu")


def test_build_engine_fails_before_loading_weights(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(EngineError, match="needs the `tensorrt` package"):
        build_engine("vit_t", backend="tensorrt")


@pytest.mark.skipif(MISSING is None, reason="TensorRT and a GPU are present: the job would run")
@pytest.mark.parametrize("prompted", [False, True], ids=["automatic", "prompts"])
def test_sam_batch_run_names_what_tensorrt_lacks(tmp_path: Path, prompted: bool) -> None:
    job = {
        "name": "tensorrt-backend",
        "input": {"uris": [str(IMAGES / "dog.jpg")]},
        "engine": {"backend": "tensorrt"},
        "output": {"uri": str(tmp_path / "out")},
        "run": {"executor": "local"},
    }
    if prompted:
        (tmp_path / "boxes.csv").write_text(f'image_uri,box\n{IMAGES / "dog.jpg"},"[10, 10, 90, 90]"\n')
        job["prompts"] = {"uri": str(tmp_path / "boxes.csv")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = subprocess.run([SAM_BATCH, "run", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert (
        "engine.backend tensorrt needs the `tensorrt` package (pip install tensorrt-cu12) and a CUDA GPU"
        in result.stderr
    )


class OrtGraph:
    """A stand-in for `TrtGraph`: one ONNX graph on onnxruntime's CPU provider, taking float
    tensors by input name and returning float32 tensors by output name. `batches`: the prompt
    count of each call."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.batches: list[int] = []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {name: tensor.to(torch.float32).numpy() for name, tensor in inputs.items()}
        if "point_coords" in feed:
            self.batches.append(feed["point_coords"].shape[0])
        return {name: torch.from_numpy(a) for name, a in zip(self.outputs, self.session.run(self.outputs, feed))}


def stand_in_engine(max_prompts: int) -> tuple[TensorRTEngine, list[OrtGraph]]:
    """A `TensorRTEngine` on the CPU over onnxruntime graphs; the predictors it made, as it makes them."""
    files = cached_onnx(load_model("vit_t", str(MOBILE_SAM)))
    made: list[OrtGraph] = []

    def make_predictor() -> OrtGraph:
        made.append(OrtGraph(files.predictor))
        return made[-1]

    engine = TensorRTEngine(
        OrtGraph(files.encoder), OrtGraph(files.decoder), torch.device("cpu"), max_prompts, make_predictor
    )
    return engine, made


def test_the_engines_prompt_path_gives_the_reference_predictors_masks() -> None:
    """dog.jpg's golden prompts (boxes, points with three masks, boxes with points) through
    `pipeline.prompts` on `TensorRTEngine` with onnxruntime standing in for TensorRT, in chunks
    of 5 prompts: every mask IoU >= 0.99 and |Δ score| <= 1e-4 against the reference predictor."""
    engine, made = stand_in_engine(max_prompts=5)
    dog = load_image(str(IMAGES / "dog.jpg"))
    engine.decode(engine.encode(dog), np.array([[100.0, 100.0]]))
    assert made == []  # an automatic job never builds the predictor
    reference = json.loads((GOLDEN / "prompts" / "dog.jpg.prompts.json").read_text())["prompts"]
    prompts = [
        Prompt(
            p["prompt_id"],
            tuple(p["box"]) if p["box"] is not None else None,
            tuple(tuple(xy) for xy in p["points"] or []),
            tuple(p["point_labels"] or []),
            p["multimask_output"],
        )
        for p in reference
    ]
    height, width = dog.shape[:2]
    plan = plan_prompts(prompts, width, height, None, None, max(height, width), 0, 0)
    masks = segment_prompts(engine, ArrayScene(dog), plan, False, lambda: None)
    assert len(made) == 1 and max(made[0].batches) == 5 and sum(made[0].batches) == len(prompts)  # chunks of 5
    assert len(masks) == sum(len(p["masks"]) for p in reference)
    for index, prompt in enumerate(reference):
        mine = [m for m in masks if m.prompt == index]
        assert [m.mask_index for m in mine] == list(range(len(prompt["masks"])))
        for found, rle, score in zip(mine, prompt["masks"], prompt["scores"], strict=True):
            theirs = decode_rle(rle).astype(bool)
            ours = np.zeros_like(theirs)
            h, w = found.mask.pixels.shape
            ours[found.mask.y0 : found.mask.y0 + h, found.mask.x0 : found.mask.x0 + w] = found.mask.pixels
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99
            assert abs(found.mask.iou - score) <= 1e-4


def test_a_prompt_beyond_the_predictor_profile_is_refused_before_the_engine_is_built() -> None:
    engine, made = stand_in_engine(max_prompts=64)
    crop = engine.encode(np.zeros((64, 64, 3), dtype=np.uint8))
    n = PREDICTOR_PROFILE.max_points - 1  # with a box: two corners more
    points, labels, box = np.zeros((1, n, 2)), np.ones((1, n), dtype=np.int64), np.array([[0.0, 0.0, 9.0, 9.0]])
    with pytest.raises(EngineError, match=f"at most {PREDICTOR_PROFILE.max_points} labelled points"):
        engine.predict(crop, points, labels, box, False)
    assert made == []
    low_res, iou = engine.predict(crop, points[:, 1:], labels[:, 1:], box, True)
    assert tuple(low_res.shape) == (1, 3, 256, 256) and tuple(iou.shape) == (1, 3)


@pytest.fixture(scope="module")
def gpu_engines():
    return build_engine("vit_t", device="cuda"), {
        precision: build_engine("vit_t", device="cuda", backend="tensorrt", precision=precision)
        for precision in ("fp32", "fp16")
    }


@needs_tensorrt
def test_tensorrt_fp32_matches_torch(gpu_engines) -> None:
    torch_engine, trt_engines = gpu_engines
    dog = load_image(str(IMAGES / "dog.jpg"))
    expected, crop = torch_engine.encode(dog), trt_engines["fp32"].encode(dog)
    assert float((crop.embedding - expected.embedding).norm() / expected.embedding.norm()) < 1e-3
    points = np.random.default_rng(0).uniform(0, 1, (300, 2)) * [dog.shape[1], dog.shape[0]]
    logits, iou = trt_engines["fp32"].decode(expected, points)
    want_logits, want_iou = torch_engine.decode(expected, points)
    torch.testing.assert_close(logits, want_logits, atol=2e-2, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=2e-3, rtol=0)


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_masks_agree_with_torch(gpu_engines, precision: str) -> None:
    torch_engine, trt_engines = gpu_engines
    dog = load_image(str(IMAGES / "dog.jpg"))
    params = AmgParams(points_per_side=16, points_per_batch=256)
    expected = to_records(generate_masks(torch_engine, dog, params))
    ours = to_records(generate_masks(trt_engines[precision], dog, params))
    found = agreement(ours, expected)
    assert found.recall >= MIN_AGREEMENT and found.precision >= MIN_AGREEMENT, found


@needs_tensorrt
def test_tensorrt_prompts_match_torch(gpu_engines) -> None:
    torch_engine, trt_engines = gpu_engines
    dog = load_image(str(IMAGES / "dog.jpg"))
    crop = torch_engine.encode(dog)
    corners = np.random.default_rng(0).uniform(0, 1, (100, 2, 2)) * [dog.shape[1], dog.shape[0]]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    logits, iou = trt_engines["fp32"].predict(crop, None, None, boxes, True)
    want_logits, want_iou = torch_engine.predict(crop, None, None, boxes, True)
    torch.testing.assert_close(logits, want_logits, atol=2e-2, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=2e-3, rtol=0)
