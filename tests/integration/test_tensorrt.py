"""The TensorRT back-end: its configuration without TensorRT, its error without it, and (on a GPU
with `tensorrt` installed) parity with the torch engine. The ONNX graphs it consumes are built and
checked in test_onnx.py; here, that they carry what the precision pinning relies on.
"""

from __future__ import annotations

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
    DecoderProfile,
    _pin_layers,
    check_precision,
    pinned_to_fp32,
    plan_name,
    require_tensorrt,
)
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES

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
    decomposed; softmax is one node; the point encoding's nodes are named under prompt_encoder/."""
    files = cached_onnx(load_model("vit_t"))
    for path in (files.encoder, files.decoder):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert "LayerNormalization" in ops and "Softmax" in ops
        assert "Pow" not in ops and "ReduceMean" not in ops  # no hand-written variance in fp16
    decoder = onnx.load(str(files.decoder)).graph.node
    trig = [node.name for node in decoder if node.op_type in ("Sin", "Cos")]
    assert trig and all(pinned_to_fp32("UNARY", name) for name in trig)


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
def test_sam_batch_run_names_what_tensorrt_lacks(tmp_path: Path) -> None:
    job = {
        "name": "tensorrt-backend",
        "input": {"uris": [str(IMAGES / "dog.jpg")]},
        "engine": {"backend": "tensorrt"},
        "output": {"uri": str(tmp_path / "out")},
        "run": {"executor": "local"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = subprocess.run([SAM_BATCH, "run", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert (
        "engine.backend tensorrt needs the `tensorrt` package (pip install tensorrt-cu12) and a CUDA GPU"
        in result.stderr
    )


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
